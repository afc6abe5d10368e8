"""Generation at scale (engine/generation.py ShardedGenerator, vllm_engine.py; recipes/sami loop.py, sample.py,
evaluation.py): per-iteration query slices, sampling split across torchrun processes and equal to one process,
a SIGKILL mid-sampling resumed to what an uninterrupted run writes, the shared prefix KV cache expanded (a view, not
a copy) with the outputs of the per-row copy, and the vLLM engine's import guard and requests (vllm is absent here;
tests/gpu/test_vllm_engine.py runs it against HF generate on a GPU)."""

import copy
import json
import random
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from test_sami_loop import ROOT, cli, run, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from sami_kernels.engine import vllm_engine
from sami_kernels.engine.generation import GenerationConfig, HFGenerator
from sami_kernels.engine.models import resolve_model_path
from sami_kernels.engine.tokens import encode
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.sami.config import SAMIConfig
from sami_kernels.recipes.sami.loop import iteration_queries, split_queries

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny-random")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def lines(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---- per-iteration slices -----------------------------------------------------------------------------------------
def test_iteration_queries_take_consecutive_slices_and_wrap():
    rng = random.Random(3)
    train = [f"q{k}" for k in range(rng.randint(11, 17))]
    steps, B = [2, 3, 1, 4], 3
    offset = 0
    for t, k in enumerate(steps):
        expected = [train[(offset + i) % len(train)] for i in range(k * B)]
        assert iteration_queries(train, steps, B, t) == expected
        offset += k * B
    assert iteration_queries(train, [20], B, 0) == train  # more than the data: every query once


def test_each_iteration_samples_only_its_slice(tmp_path):
    config = tiny_config(tmp_path, training={"iterations": 2, "steps": [1, 2], "batch_queries": 3})
    run(config)
    train, _ = split_queries(from_mapping(SAMIConfig, config))
    for t, (start, count) in enumerate([(0, 3), (3, 6)]):
        counts = json.loads((tmp_path / f"iter-{t}" / "generations.counts.json").read_text())
        assert counts["queries"] == count
        assert {r["query"] for r in lines(tmp_path / f"iter-{t}" / "generations.jsonl")} <= set(
            train[start : start + count]
        )
        assert len(lines(tmp_path / f"stage-iter-{t}.log.jsonl")) >= 2  # batch by batch (batch_size 5, 2 x count rows)


# ---- ShardedGenerator across processes ----------------------------------------------------------------------------
SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch.distributed as dist
    from sami_kernels.engine.generation import ShardedGenerator

    class Engine:  # text = the prompt reversed and its seed; records which process made which row
        def generate_with_status(self, prefix, prompts, *, seeds=None):
            with open(sys.argv[1] + f".rank{os.environ.get('RANK', '0')}", "a") as f:
                f.write("".join(p + "\\n" for p in prompts))
            return [(prefix + p[::-1] + f"/{s}", len(p) % 2 == 0) for p, s in zip(prompts, seeds or [None] * 99)]

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    requests = json.loads(open(sys.argv[2]).read())
    outputs = ShardedGenerator(Engine(), 3).generate_many([(p, q, s) for p, q, s in requests])
    if int(os.environ.get("RANK", "0")) == 0:
        open(sys.argv[1], "w").write(json.dumps(outputs))
    if dist.is_initialized():  # gloo aborts at exit with a group left open
        dist.destroy_process_group()
    """
)


def test_sharded_generator_two_processes_equal_one(tmp_path):
    rng = random.Random(5)
    requests = [
        [f"P{r}:", ["x" * rng.randint(1, 9) + str(k) for k in range(rng.randint(1, 8))], None] for r in range(3)
    ]
    requests[1][2] = [rng.randrange(1000) for _ in requests[1][1]]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    (tmp_path / "script.py").write_text(SHARDED_SCRIPT)
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    for name, launcher in (("one", (sys.executable,)), ("two", TORCHRUN)):
        command = [*launcher, str(tmp_path / "script.py"), str(tmp_path / name), str(tmp_path / "requests.json")]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = json.loads((tmp_path / "one").read_text()), json.loads((tmp_path / "two").read_text())
    assert one == two
    assert one[1][0][0] == f"P1:{requests[1][1][0][::-1]}/{requests[1][2][0]}"  # in request order, seeds per row
    made = [(tmp_path / f"two.rank{r}").read_text().split() for r in (0, 1)]
    assert made[0] and made[1] and sorted(made[0] + made[1]) == sorted(p for _, q, _ in requests for p in q)


# ---- the SAMI loop's sampling phases under torchrun, and after a SIGKILL ------------------------------------------
def sampling_config(out, **generation) -> dict:
    return tiny_config(
        out,
        constitutions={"set": "concise"},
        data={"heldout_queries": 4, "train_queries": 8},
        generation={
            "do_sample": True,
            "temperature": 1.3,
            "top_p": 0.9,
            "max_new_tokens": 8,
            "batch_size": 3,
            **generation,
        },
        training={"steps": [1], "batch_queries": 4, "micro_batch_queries": 2},
        evaluation={"judge_queries": 3, "adherence_queries": 2},
    )


SAMPLED = ("heldout.jsonl", "iter-0/generations.jsonl", "judge.jsonl", "adherence.jsonl")


def test_torchrun_sampling_and_evaluation_equal_one_process(tmp_path):
    one, two = sampling_config(tmp_path / "one"), sampling_config(tmp_path / "two")
    processes = [cli(one, tmp_path, name="one.yaml"), cli(two, tmp_path, *TORCHRUN, name="two.yaml")]
    for p in processes:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output
    for name in SAMPLED:
        a, b = lines(tmp_path / "one" / name), lines(tmp_path / "two" / name)
        assert a == b and a, name
    assert len({tuple(r["responses"]) for r in lines(tmp_path / "one" / "iter-0" / "generations.jsonl")}) > 1
    for log in ("stage-heldout", "stage-iter-0", "stage-eval-base", "stage-eval-trained"):
        assert (tmp_path / "two" / f"{log}.log.jsonl").stat().st_size > 0


def test_sigkill_mid_sampling_then_rerun_equals_uninterrupted(tmp_path):
    killed = sampling_config(tmp_path / "killed", batch_size=1, max_new_tokens=48)
    whole = sampling_config(tmp_path / "whole", batch_size=1, max_new_tokens=48)
    log = tmp_path / "killed" / "stage-heldout.log.jsonl"
    process = cli(killed, tmp_path, name="killed.yaml")
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and process.poll() is None:
        assert time.time() < deadline, "no sampling batch was logged"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "heldout.jsonl").exists(), "killed after the sampling phase, not in it"
    logged_before = len(log.read_text().splitlines())
    for p in (cli(killed, tmp_path, name="killed.yaml"), cli(whole, tmp_path, name="whole.yaml")):
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output
    total = len(lines(tmp_path / "whole" / "stage-heldout.log.jsonl"))
    assert logged_before < total == len(lines(log))  # resumed: no logged batch generated again
    for name in SAMPLED:
        assert lines(tmp_path / "killed" / name) == lines(tmp_path / "whole" / name), name


# ---- HF engine: the shared prefix KV cache is expanded, not copied -------------------------------------------------
class CopyingPrefixCache(HFGenerator):
    """The former implementation: the stored prefix cache deep-copied, cut and repeated for every row."""

    def _prefix_cache(self, prefix_ids, shared, rows):
        if shared == 0:
            return None
        super()._prefix_cache(prefix_ids, shared, 1)  # computes and stores the prefix's cache once
        cache = copy.deepcopy(self._prefix[1])
        if len(prefix_ids) > shared:
            cache.crop(shared - len(prefix_ids))
        cache.batch_repeat_interleave(rows)
        return cache


@pytest.mark.parametrize("do_sample", [False, True])
def test_expanded_prefix_cache_equals_the_per_row_copy(tiny, do_sample):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=10, batch_size=3, do_sample=do_sample, top_p=0.8, stop_strings=())
    prefix = "System: 1. The assistant is helpful.\n\nHuman:"
    prompts = [" hi", " How do I keep basil fresh after buying it?", " Why?", " What is a good way to study?", " Ok"]
    seeds = torch.randint(0, 2**31, (len(prompts),)).tolist()
    expanded = HFGenerator(model, tokenizer, config).generate_with_status(prefix, prompts, seeds=seeds)
    copied = CopyingPrefixCache(model, tokenizer, config).generate_with_status(prefix, prompts, seeds=seeds)
    assert expanded == copied and len({text for text, _ in expanded}) > 1


def test_prefix_cache_rows_share_the_stored_tensors(tiny):
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=2, stop_strings=()))
    prefix_ids = encode(tokenizer, "System: be brief, and kind.\n\nHuman: Tell me")
    with torch.no_grad():  # as in generate_with_status
        cache = generator._prefix_cache(prefix_ids, len(prefix_ids) - 2, 4)
    stored = generator._prefix[1]
    for layer, original in zip(cache.layers, stored.layers, strict=True):
        for rows, whole in ((layer.keys, original.keys), (layer.values, original.values)):
            assert rows.shape[0] == 4 and rows.shape[2] == len(prefix_ids) - 2 and rows.stride(0) == 0
            assert rows.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert torch.equal(rows[3], whole[0, :, : len(prefix_ids) - 2])
    assert stored.layers[0].keys.shape[2] == len(prefix_ids)  # the stored cache is left whole for the next batch


# ---- vLLM engine without vllm --------------------------------------------------------------------------------------
def test_vllm_engine_without_vllm_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # an import of vllm fails, as where it is not installed
    with pytest.raises(ImportError, match=r"generation\.engine: vllm needs the vllm package.*generation\.engine: hf"):
        vllm_engine.import_vllm()
    config = tiny_config(tmp_path, generation={"engine": "vllm"})
    with pytest.raises(ImportError, match=r"generation\.engine: vllm needs the vllm package"):
        run(config)


class FakeVLLM(types.SimpleNamespace):
    """The parts of vllm's offline API the engine uses; LLM.generate answers each prompt with fixed token ids."""

    def __init__(self, answers):
        calls = self.calls = []

        class LLM:
            def __init__(self, **options):
                calls.append(("LLM", options))

            def generate(self, prompts, params, **options):
                calls.append(("generate", prompts, params, options))
                return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=a)]) for a in answers]

        super().__init__(LLM=LLM, SamplingParams=lambda **fields: fields)


def test_vllm_requests_and_outputs(tiny, monkeypatch):
    _, tokenizer = tiny
    prefix, prompts = "System: be brief.\n\nHuman:", [" How do I keep basil fresh?", " Why?"]
    stop = tokenizer(" Human:", add_special_tokens=False).input_ids
    answers = [[*tokenizer(" Cut the", add_special_tokens=False).input_ids, *stop, 7], [11, 12, 13]]
    fake = FakeVLLM(answers)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    config = GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.7, top_p=0.9, stop_strings=("Human:",))
    generator = vllm_engine.VLLMGenerator("/models/m", tokenizer, config, dtype="float32")
    seeds = [random.randrange(2**31) for _ in prompts]
    outputs = generator.generate_with_status(prefix, prompts, seeds=seeds)
    assert fake.calls[0] == ("LLM", {"model": "/models/m", "tokenizer": "/models/m", "dtype": "float32"})
    _, sent, params, options = fake.calls[1]
    assert sent == [{"prompt_token_ids": encode(tokenizer, prefix + p)} for p in prompts]
    assert params == [{"max_tokens": 3, "stop": ["Human:"], "seed": s, "temperature": 0.7, "top_p": 0.9} for s in seeds]
    assert options == {"lora_request": None, "use_tqdm": False}
    assert outputs == [(" Cut the ", True), (tokenizer.decode([11, 12, 13], skip_special_tokens=True), False)]
    greedy = vllm_engine.build_requests(fake, tokenizer, GenerationConfig(stop_strings=()), prefix, prompts, None)[1]
    assert greedy == [{"max_tokens": 350, "stop": None, "seed": None, "temperature": 0}] * 2
    with pytest.raises(ValueError, match=r"generation\.engine: vllm does not support \['ngram_penalties'\]"):
        vllm_engine.VLLMGenerator("/m", tokenizer, GenerationConfig(ngram_penalties={3: 1.0}))
