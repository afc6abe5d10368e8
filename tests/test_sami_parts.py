"""The SAMI loop's parts, each on its own: constitutions, data files, config, generation with a shared prefix,
filters, the judge, and gradient accumulation of one optimiser step against the plain mean loss."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sami_kernels as sk
from sami_kernels.engine.generation import GenerationConfig, HFGenerator, cut_at_stop, shared_prefix_prompts
from sami_kernels.engine.models import tiny_random_path
from sami_kernels.engine.pairs import PairScorer
from sami_kernels.recipes.config import from_mapping, load_config
from sami_kernels.recipes.data import load_queries, read_jsonl, write_jsonl
from sami_kernels.recipes.sami.config import SAMIConfig
from sami_kernels.recipes.sami.constitutions import load_principle_set, sample_constitutions
from sami_kernels.recipes.sami.evaluation import judge_margins, record_batch
from sami_kernels.recipes.sami.sample import keep_reason
from sami_kernels.recipes.sami.session import Session
from sami_kernels.recipes.sami.train import optimizer_step, prompt_rng, query_at
from sami_kernels.recipes.training import Trainable


@pytest.fixture(scope="module")
def tiny():
    path = tiny_random_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---- constitutions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4])
def test_antithesis_scheme_positive_first_negatives_distinct(n):
    principles = load_principle_set("dialogue")
    rng = random.Random(n)
    for _ in range(20):
        cs = sample_constitutions(principles, n, rng)
        assert cs[0] == principles.positive()
        assert len(set(cs)) == n
        assert all(not all(follows for _, follows in c) for c in cs[1:])  # every negative flips something
        assert all([name for name, _ in c] == ["helpful", "harmless"] for c in cs)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_opposite_scheme_second_is_elementwise_opposite(n):
    pool = load_principle_set("pool")
    rng = random.Random(0)
    seen_first = set()
    for _ in range(30):
        cs = sample_constitutions(pool, n, rng, scheme="opposite", draw=2)
        assert [(name, not f) for name, f in cs[0]] == list(cs[1])
        assert len(set(cs)) == n and all(len(c) == 2 for c in cs)
        seen_first.add(cs[0])
    assert len(seen_first) > 5  # principles and signs are drawn at random


def test_scheme_limits_are_errors():
    principles = load_principle_set("dialogue")
    with pytest.raises(ValueError, match="constitutions.n = 5"):
        sample_constitutions(principles, 5, random.Random(0))
    with pytest.raises(ValueError, match=">= 2"):
        sample_constitutions(principles, 1, random.Random(0))
    with pytest.raises(ValueError, match="scheme"):
        sample_constitutions(principles, 2, random.Random(0), scheme="random")


def test_render_shuffles_order_per_prompt_but_not_content():
    pool = load_principle_set("pool")
    constitution = tuple((p.name, k % 2 == 0) for k, p in enumerate(pool.principles))
    written = pool.render(constitution)
    orders = {pool.render(constitution, random.Random(seed)) for seed in range(10)}
    assert len(orders) > 1
    strip = lambda text: sorted(line.split(". ", 1)[1] for line in text.splitlines())  # noqa: E731
    assert all(strip(o) == strip(written) for o in orders)


def test_user_principle_sets_from_yaml_and_json(tmp_path):
    entry = {"name": "brief", "principle": "The assistant is brief.", "antithesis": "The assistant rambles."}
    (tmp_path / "mine.json").write_text(json.dumps({"name": "mine", "principles": [entry]}))
    (tmp_path / "mine.yaml").write_text("name: mine\nprinciples:\n  - {name: brief, principle: a, antithesis: b}\n")
    assert load_principle_set(str(tmp_path / "mine.json")).render((("brief", False),)) == "1. The assistant rambles."
    assert load_principle_set(str(tmp_path / "mine.yaml")).principles[0].antithesis == "b"
    (tmp_path / "bad.yaml").write_text("principles:\n  - {name: x, principle: a}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: principles\[0\] must have the keys"):
        load_principle_set(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_principle_set("no-such-set")


# ---- data ------------------------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"record 2 has no non-empty string field 'prompt'"):
        load_queries(str(path), field="prompt")


def test_query_sources(tmp_path):
    assert len(load_queries("builtin:dialogue")) == 48 and len(load_queries("builtin:summarisation")) == 16
    path = tmp_path / "q.jsonl"
    write_jsonl(path, [{"prompt": "first?"}, {"prompt": " second? "}])
    assert load_queries(str(path), field="prompt") == ["first?", "second?"]
    assert load_queries("hf:json", field="prompt", data_files=str(path)) == ["first?", "second?"]  # via datasets
    with pytest.raises(ValueError, match="no built-in query set"):
        load_queries("builtin:nothing")


def test_write_jsonl_is_all_or_nothing(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])

    def records():
        yield {"a": 2}
        raise KeyboardInterrupt  # killed half-way through making the records

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(path, records())
    assert read_jsonl(path) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


# ---- config ----------------------------------------------------------------------------------------------------
def test_config_keys_are_checked(tmp_path):
    config = from_mapping(SAMIConfig, {"training": {"steps": [3], "iterations": 1, "optimizer": {"lr": 1}}})
    assert config.training.steps == (3,) and config.training.optimizer.lr == 1.0
    with pytest.raises(ValueError, match=r"training: unknown key\(s\) \['step'\]"):
        from_mapping(SAMIConfig, {"training": {"step": 3}})
    with pytest.raises(ValueError, match=r"training.optimizer.name: expected one of \['adamw', 'rmsprop'\]"):
        from_mapping(SAMIConfig, {"training": {"optimizer": {"name": "sgd"}}})
    with pytest.raises(ValueError, match="training.batch_queries: expected int, got 'many'"):
        from_mapping(SAMIConfig, {"training": {"batch_queries": "many"}})
    with pytest.raises(ValueError, match="training.steps has 3 entries for training.iterations = 1"):
        from_mapping(SAMIConfig, {"training": {"iterations": 1}}).validate()
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  iterations: 1\n  steps: [2]\n")
    config = load_config(SAMIConfig, path, ["training.lora={r: 4}", "seed=3", "training.optimizer.lr=2e-5"])
    assert config.training.lora.r == 4 and config.training.lora.alpha == 16 and config.seed == 3
    assert config.training.optimizer.lr == 2e-5  # YAML 1.1 reads 2e-5 as a string
    with pytest.raises(ValueError, match="training.optimizer.lr: expected float, got '2e-5x'"):
        load_config(SAMIConfig, path, ["training.optimizer.lr=2e-5x"])


# ---- generation ------------------------------------------------------------------------------------------------
def test_shared_prefix_prompts_rebuild_the_template():
    template = "S: {constitution}\nQ: {query}\nA ({constitution}):"
    prefix, prompts = shared_prefix_prompts(template, ["x", "yy"], constitution="c")
    assert [prefix + p for p in prompts] == [template.format(constitution="c", query=q) for q in ("x", "yy")]


def test_generation_with_shared_prefix_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prefix = "System: 1. The assistant is helpful.\n\nHuman:"
    prompts = [" hi", " How do I keep basil fresh after buying it?", " Why?", " What is a good way to study?"]
    config = GenerationConfig(max_new_tokens=9, batch_size=3, stop_strings=())
    generator = HFGenerator(model, tokenizer, config)
    batched = generator.generate(prefix, prompts)
    assert generator.generate(prefix, prompts[:2]) == batched[:2]  # the cached prefix, reused
    assert generator.prefix_encodings == 1
    generator.generate(prefix + " x", prompts[:1])
    assert generator.prefix_encodings == 2
    for prompt, got in zip(prompts, batched, strict=True):
        ids = torch.tensor(
            [
                [
                    tokenizer.bos_token_id,
                    *tokenizer(prefix, add_special_tokens=False).input_ids,
                    *tokenizer(prompt, add_special_tokens=False).input_ids,
                ]
            ]
        )
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False, pad_token_id=0
        )
        assert got == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_stop_strings_and_filters():
    assert cut_at_stop(" Sure.\n\nHuman: next", ("Human:", "\n\nHuman")) == " Sure."
    assert cut_at_stop(" no stop", ("###",)) == " no stop"
    assert keep_reason("dialogue", [" a", " b"]) is None
    assert keep_reason("dialogue", [" a", " a"]) == "identical responses"
    assert keep_reason("dialogue", [" a", "  "]) == "empty"
    assert keep_reason("dialogue", [" Dear [insert name]", " b"]) == "contains '[insert'"
    assert keep_reason("dialogue", [" a", " I'm sorry, no."]) == "contains 'sorry'"
    assert keep_reason("summarisation", [" long", " short."]) == "no final period"


# ---- judge -----------------------------------------------------------------------------------------------------
def test_judge_is_symmetric_in_the_two_responses(tiny):
    """Swapping trained and base swaps the two orders and negates the margins; identical responses are not judged."""
    model, tokenizer = tiny
    args = (model, tokenizer, "1. The assistant is helpful.", "How do I keep basil fresh?")
    pairs = [(" Trim the stems and put them in water.", " Basil is green."), (" Yes.", " No, never.")]
    for a, b in pairs:
        as_a, as_b = judge_margins(*args, a, b)
        assert judge_margins(*args, b, a) == (-as_b, -as_a)
    assert judge_margins(*args, " same", " same") is None


# ---- one optimiser step ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [1, 2, 4])
def test_accumulated_gradient_is_the_mean_loss_gradient(micro, tmp_path):
    """B = 4 queries in micro-batches of 1, 2 or 4: the gradient handed to the optimiser equals the gradient of
    the plain mean InfoNCE loss over the 4 queries (no zero_grad between micro-batches, right weights)."""
    config = from_mapping(
        SAMIConfig,
        {
            "model": "tiny-random",
            "output_dir": str(tmp_path),
            "progress": False,
            "training": {
                "iterations": 1,
                "steps": [1],
                "batch_queries": 4,
                "micro_batch_queries": micro,
                "optimizer": {"max_grad_norm": 0.0},
            },
        },
    )
    run = Session(config)
    model = run.load(None, trainable=True).train()
    rng = random.Random(0)
    records = [
        {
            "query": f"question {q}?",
            "constitutions": [list(map(list, c)) for c in sample_constitutions(run.principles, 2, rng)],
            "responses": [f" answer {q}{'!' * q}", f" reply {q}"],
        }
        for q in range(5)
    ]
    captured = {}

    class Capture(torch.optim.SGD):
        def step(self, closure=None):
            captured.update({id(p): p.grad.clone() for p in params})

    trainable = Trainable(model, master_weights=True)
    params = trainable.parameters()
    optimizer = Capture(params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    optimizer_step(run, PairScorer(model), trainable, optimizer, scheduler, records, 0, 0)

    chosen = [records[query_at(0, 0, p, len(records))] for p in range(4)]
    batch = record_batch(
        run.tokenizer, chosen, run.principles, run.training_template, rng_for=lambda b, i: prompt_rng(0, 0, b, i)
    )
    loss, _ = sk.sami_step_loss(model, batch)
    expected = torch.autograd.grad(loss, params)
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(captured[id(p)], g, rtol=1e-5, atol=1e-7)
