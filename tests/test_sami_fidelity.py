"""SAMI's fidelity to the paper and its reference code: every training prompt shuffles its own principle order, the
reference's sampling filters, the chat-template prompt format, the judge's ties and position flips, and the
principles' judge-free adherence measures (units, then one small run end to end)."""

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from sami_kernels.engine.models import resolve_model_path
from sami_kernels.engine.pairs import PairScorer
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.sami import evaluation
from sami_kernels.recipes.sami.config import PRESETS, TEMPLATES, SAMIConfig
from sami_kernels.recipes.sami.constitutions import Measure, load_principle_set, sample_constitutions
from sami_kernels.recipes.sami.evaluation import adherence_gap, judge_counts, judge_outcome, judge_prompt
from sami_kernels.recipes.sami.loop import print_summary, run_sami
from sami_kernels.recipes.sami.sample import keep_reason, scoring_reason
from sami_kernels.recipes.sami.session import Session
from sami_kernels.recipes.sami.train import optimizer_step
from sami_kernels.recipes.training import Trainable


def session_config(tmp_path, **top) -> SAMIConfig:
    mapping = {
        "model": "tiny-random",
        "output_dir": str(tmp_path),
        "progress": False,
        "training": {"iterations": 1, "steps": [1], "batch_queries": 4, "micro_batch_queries": 2},
        **top,
    }
    return from_mapping(SAMIConfig, mapping)


# ---- item 3: a principle order per (record, constitution) -------------------------------------------------------
def test_every_training_prompt_shuffles_its_own_order(tmp_path, monkeypatch):
    """The N constitutions of one query get independent orders (not one permutation for all), the same again on a
    second (resumed) call, each a reordering of its own constitution's clauses."""
    run = Session(session_config(tmp_path, constitutions={"set": "pool", "n": 4}))
    pool = run.principles
    rng = random.Random(7)
    records = [
        {
            "query": f"question {q}?",
            "constitutions": [list(map(list, c)) for c in sample_constitutions(pool, 4, rng)],
            "responses": [f" answer {q} {k}{'!' * rng.randrange(3)}" for k in range(4)],
        }
        for q in range(6)
    ]
    seen, engine_batch = [], evaluation.PairBatch

    class Capture(engine_batch):
        @classmethod
        def from_texts(cls, tokenizer, queries, constitutions, responses, **options):
            seen.append([list(texts) for texts in constitutions])
            return engine_batch.from_texts(tokenizer, queries, constitutions, responses, **options)

    monkeypatch.setattr(evaluation, "PairBatch", Capture)
    model = run.load(None, trainable=True).train()
    trainable = Trainable(model, master_weights=True)
    optimizer = torch.optim.SGD(trainable.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for _ in range(2):
        optimizer_step(run, PairScorer(model), trainable, optimizer, scheduler, records, 0, 0)
    first, second = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert first == second  # reproducible: a resumed step shuffles the same way
    name_of = {text: p.name for p in pool.principles for text in (p.principle, p.antithesis)}
    prompts = [texts for batch in first for texts in batch]
    assert len(prompts) == 4
    for texts in prompts:
        orders = [tuple(name_of[line.split(". ", 1)[1]] for line in text.splitlines()) for text in texts]
        assert sorted(orders[0]) == sorted(p.name for p in pool.principles)
        assert len(set(orders)) > 1, orders  # 10 principles: one shared order would be a 1e-19 coincidence


# ---- item 7: the reference's filters ------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["dialogue", "summarisation"])
def test_artefacts_drop_a_query_for_both_tasks(task):
    rng = random.Random(task)
    for artefact in ("[insert", "[]", "]", "sorry", "Response"):
        words = [rng.choice(["The post", "asks", "whether", "a friend"]) for _ in range(rng.randrange(1, 6))]
        bad = f"{' '.join(words)} {artefact} here."
        responses = [bad, "Fine."] if rng.random() < 0.5 else ["Fine.", bad]
        assert keep_reason(task, responses) == f"contains {artefact!r}"
    assert keep_reason(task, ["Sorry to hear it.", "Fine."]) is None  # case-sensitive, as the reference
    assert keep_reason(task, ["An [aside).", "b."]) is None


def test_summaries_need_a_final_period_on_the_positive_response_only():
    assert keep_reason("summarisation", ["The post asks why.", "The post rambles on"]) is None
    assert keep_reason("summarisation", ["The post asks why", "The post rambles on."]) == "no final period"
    assert keep_reason("dialogue", ["No period", "none here"]) is None


# ---- item 8: the chat-template prompt format --------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))


def test_a_summary_that_merges_with_the_prefill_is_dropped(smollm2_tokenizer):
    """The summarisation prompt ends in the prefill "The post": a summary continuing the word has no tokens of its
    own after the prompt, so the query is dropped (filters or not) instead of failing the run at scoring time."""
    principles = load_principle_set("summarisation")
    constitutions = [[[p.name, True] for p in principles.principles], [[p.name, False] for p in principles.principles]]

    def reason(*responses):
        record = {"query": "My flatmate never cleans.", "constitutions": constitutions, "responses": list(responses)}
        return scoring_reason(smollm2_tokenizer, principles, TEMPLATES["summarisation"][1], record)

    assert reason(" asks how to share chores.", " describes, at length, a flatmate.") is None
    assert reason(" asks how to share chores.", "s describe a flatmate.") == "merges with the prompt"
    assert reason("er asks how to share chores.", " describes a flatmate.") == "merges with the prompt"


@pytest.mark.parametrize("task", ["dialogue", "summarisation"])
def test_chat_templates_equal_apply_chat_template(task, smollm2_tokenizer, tmp_path):
    """Session templates in chat mode, filled with a random constitution and a query with braces, equal the chat
    template applied to the messages: system = instruction + constitution, the example exchange (generation only),
    the user query; then the assistant's turn and the preset's prefill."""
    rng = random.Random(task)
    pool = load_principle_set("pool")
    constitution = pool.render(tuple((p.name, rng.random() < 0.5) for p in pool.principles), rng) + " {x}"
    query = f"What does {{{rng.randrange(100)}}} mean in f'{{y}}' and {{}}? " * rng.randrange(1, 3)
    config = {"set": "summarisation"} if task == "summarisation" else {}
    run = Session(session_config(tmp_path, model="smollm2", prompt_format="chat", constitutions=config))
    preset = PRESETS[task]
    shown = f"Post: {query}" if task == "summarisation" else query
    system = {"role": "system", "content": f"{preset.instruction}\n{constitution}"}
    example = [
        {
            "role": "user",
            "content": f"Post: {preset.example_query}" if task == "summarisation" else preset.example_query,
        },
        {"role": "assistant", "content": preset.example_response},
    ]
    for template, shot in ((run.generation_template, example), (run.training_template, [])):
        messages = [system, *shot, {"role": "user", "content": shown}]
        expected = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert template.format(constitution=constitution, query=query) == expected + preset.prefill


def test_chat_mode_refuses_a_tokenizer_without_chat_template(tmp_path):
    with pytest.raises(ValueError, match="prompt_format: chat needs a tokenizer with a chat template"):
        Session(session_config(tmp_path, prompt_format="chat"))
    with pytest.raises(ValueError, match="generation.template is set, but prompt_format: chat"):
        session_config(tmp_path, prompt_format="chat", generation={"template": "{constitution} {query}"}).validate()


# ---- item 9: the judge's counts, the adherence measures ---------------------------------------------------------
def test_chat_judge_prompt_asks_in_the_chat_template(smollm2_tokenizer):
    args = ("1. Be concise.", "How do I keep basil fresh?", " Trim the stems.", "Basil is a herb.")
    raw, chat = judge_prompt(smollm2_tokenizer, False, *args), judge_prompt(smollm2_tokenizer, True, *args)
    assert raw.startswith("System: ") and raw.endswith("\n\nAssistant: Response")
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_end|>\n<|im_start|>assistant\nResponse")
    for text in (raw, chat):
        positions = [text.index(part.strip()) for part in args]
        assert positions == sorted(positions), text  # principles, query, A, B in that order


def plain_counts(margins):
    wins = losses = ties = flips = differing = 0
    for pair in margins:
        if pair is None:
            ties += 1
            continue
        differing += 1
        a, b = pair
        if a > 0 and b > 0:
            wins += 1
        elif a < 0 and b < 0:
            losses += 1
        else:
            ties += 1
            flips += (a > 0 and b < 0) or (a < 0 and b > 0)
    n = len(margins)
    return {
        "judge_win_rate": (wins + 0.5 * ties) / n,
        "judge_wins": wins,
        "judge_losses": losses,
        "judge_ties": ties,
        "judge_flips": flips,
        "judge_flip_rate": flips / differing if differing else None,
    }


@pytest.mark.parametrize("seed", range(5))
def test_judge_counts_equal_a_plain_count(seed):
    rng = random.Random(seed)
    margin = lambda: rng.choice([0.0, rng.gauss(0, 1), rng.gauss(0, 1)])  # noqa: E731  exact zeros too
    margins = [None if rng.random() < 0.15 else (margin(), margin()) for _ in range(rng.randrange(1, 60))]
    assert judge_counts([judge_outcome(m) for m in margins]) == pytest.approx(plain_counts(margins))
    assert judge_counts([judge_outcome(None)] * 3)["judge_flip_rate"] is None


def test_measures_on_written_responses():
    responses = ["Yes.", "I'm sorry, I can't help with that.", "Basil keeps a week in water", "I cannot assist you."]
    assert Measure("words", "lower").mean(responses) == (1 + 7 + 6 + 4) / 4
    assert Measure("refusal", "higher").mean(responses) == 2 / 4
    assert Measure("refusal", "higher").mean(["I can't wait to try it!", "Sure, here it is."]) == 0.0
    assert adherence_gap(Measure("words", "lower"), follow=12.0, flip=30.5) == 18.5
    assert adherence_gap(Measure("refusal", "higher"), follow=0.25, flip=0.75) == -0.5


def test_measures_in_principle_files(tmp_path):
    entry = "{name: brief, principle: a, antithesis: b, measure: {metric: words, direction: lower}}"
    (tmp_path / "ok.yaml").write_text(f"principles:\n  - {entry}\n")
    assert load_principle_set(str(tmp_path / "ok.yaml")).principles[0].measure == Measure("words", "lower")
    assert load_principle_set("summarisation").flipped("concise") == (("concise", False), ("comprehensive", True))
    (tmp_path / "bad.yaml").write_text(f"principles:\n  - {entry.replace('lower', 'down')}\n")
    with pytest.raises(ValueError, match=r"principles\[0\].measure must be"):
        load_principle_set(str(tmp_path / "bad.yaml"))
    (tmp_path / "none.yaml").write_text("principles:\n  - {name: brief, principle: a, antithesis: b}\n")
    unmeasured = {"constitutions": {"set": str(tmp_path / "none.yaml")}, "evaluation": {"adherence_queries": 2}}
    with pytest.raises(ValueError, match="adherence_queries = 2, but no principle of constitutions.set"):
        Session(session_config(tmp_path, **unmeasured))


def test_run_reports_judge_counts_and_adherence(tmp_path, capsys):
    """tiny-random through run_sami: a judge loaded from a model path, its counts, per-order margins in judge.jsonl,
    the adherence of the measured principle per model, printed by print_summary."""
    config = {
        "model": "tiny-random",
        "output_dir": str(tmp_path),
        "progress": False,
        "generation": {"max_new_tokens": 5, "batch_size": 4, "filters": False},
        "data": {"heldout_queries": 3, "train_queries": 4},
        "training": {"iterations": 1, "steps": [1], "batch_queries": 2, "micro_batch_queries": 2},
        "evaluation": {"judge_queries": 3, "adherence_queries": 2, "judge": resolve_model_path("tiny-random")},
    }
    summary = run_sami(from_mapping(SAMIConfig, config))
    counts = [summary[f"judge_{k}"] for k in ("wins", "losses", "ties")]
    assert sum(counts) == 3 and summary["judge_flips"] <= summary["judge_ties"]
    assert summary["judge_win_rate"] == (counts[0] + counts[2] / 2) / 3
    rows = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert {"margin_trained_a", "margin_trained_b", "outcome"} <= set(rows[0])
    harmless = summary["adherence"]["harmless"]
    assert (harmless["metric"], harmless["direction"]) == ("refusal", "higher")
    for model in ("base", "trained"):
        m = harmless[model]
        assert m["gap"] == m["follow"] - m["flip"] and 0 <= m["follow"] <= 1
    assert len((tmp_path / "adherence.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    print_summary(summary)
    assert "adherence of harmless (refusal, higher" in capsys.readouterr().out
