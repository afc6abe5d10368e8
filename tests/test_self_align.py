"""SELF-ALIGN: the text filters, the generation constraints, the fused packed SFT loss against transformers' own
loss, multiple-choice scoring against full logits, and every stage end to end on the tiny random model
(resumable, with counts per filter reason)."""

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sami_kernels.engine.generation import FirstTokenBan, HFGenerator, NGramFrequencyPenalty
from sami_kernels.engine.models import tiny_random_path
from sami_kernels.engine.packed import continuation_logprobs, pack, packed_logprobs, tokenize_pair
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.data import write_jsonl
from sami_kernels.recipes.self_align import answers, finetune, sft
from sami_kernels.recipes.self_align.config import IDENTITY, TERMINATOR, SelfAlignConfig
from sami_kernels.recipes.self_align.evaluation import hhh_accuracy, load_items
from sami_kernels.recipes.self_align.loop import run_self_align
from sami_kernels.recipes.self_align.session import Session
from sami_kernels.recipes.self_align.text import (
    NearDuplicates,
    answer_reject_reason,
    cut_repeated_clause,
    finish_answer,
    instruction_reject_reason,
    parse_numbered,
    principled_response,
    topic_reject_reason,
    verbose_reject_reason,
    word_ngrams,
)
from sami_kernels.recipes.stage_file import StageFile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    path = tiny_random_path()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


# ---- text ------------------------------------------------------------------------------------------------------
def test_instruction_and_topic_filters():
    assert parse_numbered(" Write a poem about rain.\n7. Summarise this text\nplease\n8) List three fruits.") == [
        "Write a poem about rain.",
        "Summarise this text",
        "List three fruits.",
    ]
    assert instruction_reject_reason("Too short here") == "length"
    assert instruction_reject_reason("word " * 151) == "length"
    assert instruction_reject_reason("Describe the image of a cat in detail.") == "blacklisted keyword"
    assert instruction_reject_reason("Explain how to map a network drive.") == "blacklisted keyword"
    assert instruction_reject_reason("Explain how mapping works in functional languages.") is None  # word match only
    assert instruction_reject_reason("- Write a haiku about the sea.") == "punctuation or non-ASCII start"
    assert instruction_reject_reason("\u00c9crire a short note to a friend.") == "punctuation or non-ASCII start"
    assert topic_reject_reason("Black Holes") is None
    assert topic_reject_reason("Very Long Topic Name") == "topic length"
    assert topic_reject_reason("black holes") == "topic not capitalised"
    assert topic_reject_reason("Black Holes.") == "topic punctuation"


def test_near_duplicates_rouge_and_exact():
    unique = NearDuplicates(["Write a short poem about the autumn rain in the city."])
    assert unique.reason("write a short poem about the autumn rain in the city.") == "exact duplicate"
    assert unique.reason("Write a short poem about the autumn rain in a city.") == "ROUGE-L near duplicate"
    assert unique.reason("Explain how compound interest grows savings over ten years.") is None


def test_principled_response_filters():
    leaks = word_ngrams("the red panda belongs to its own family called ailuridae today", 8)
    kwargs = dict(
        identity=IDENTITY,
        answer_marker="### Nova\n",
        terminator=TERMINATOR,
        min_chars=40,
        leak_ngrams=leaks,
        leak_n=8,
        rename=("Nova", "Dromedary"),
        instruction="How is green tea made?",
    )
    thoughts = f"{IDENTITY} The user asks about tea. I should follow rules 2 (informative).\n\n### Nova\n"
    answer = "Green tea is steamed or pan-fired soon after picking, which stops oxidation. Nova hopes this helps."
    response, reason = principled_response(thoughts + answer, complete=True, **kwargs)
    assert reason is None and response == answer.replace("Nova", "Dromedary") + TERMINATOR
    cut_by_budget = answer.replace("Nova", "Dromedary").removesuffix(" helps.")  # its last word may be partial
    assert principled_response(thoughts + answer, complete=False, **kwargs)[0] == cut_by_budget
    assert principled_response("Hello. ### Nova\n" + answer, complete=True, **kwargs) == (None, "no identity sentence")
    assert principled_response(f"{IDENTITY} Thinking.", complete=True, **kwargs) == (None, "no answer")
    assert principled_response(thoughts + "Too short.", complete=True, **kwargs) == (None, "too short")
    assert principled_response(
        thoughts + "I'm sorry, I cannot talk about tea, it is a subject I avoid.", complete=True, **kwargs
    ) == (None, "refusal opening")
    restated = "I cannot check that now. I should follow rules 9 (static), 7 (candor), as I said before."
    assert principled_response(thoughts + restated, complete=True, **kwargs) == (None, "thoughts in the answer")
    leak = "As you asked: the red panda belongs to its own family called Ailuridae today, yes."
    assert principled_response(thoughts + leak, complete=True, **kwargs) == (None, "exemplar leak")
    repeated = "Tea is good in the morning, tea is warm in the winter, tea is good in the morning, and so on."
    cut, _ = principled_response(thoughts + repeated, complete=True, **kwargs)
    assert cut == "Tea is good in the morning, tea is warm in the winter,"
    assert not cut.endswith(TERMINATOR)  # cut for repetition: no longer a complete answer
    assert cut_repeated_clause("A. B. A. C.") == "A. B."


def test_answer_finishing_and_lengths_follow_the_reference():
    """A budget-cut answer loses its last (maybe partial) word; stage 2's min_chars binds complete answers, stage 4's
    binds budget-cut ones; an answer holding its instruction (> 16 chars) verbatim is dropped in both stages."""
    rng = random.Random(5)
    vocabulary = "amber basalt cedar delta ember fjord granite harbor island juniper kelp lagoon meadow nectar".split()
    words = rng.sample(vocabulary, 9)
    text = " ".join(words[:4]) + ", " + " ".join(words[4:8]) + ". " + words[8]
    assert finish_answer(text, True) == (text, True)
    assert finish_answer(text + "Par", False) == (text.removesuffix(" " + words[8]), False)  # "<word>Par" cut
    assert finish_answer(text + "\n", False) == (text, False)  # ended in whitespace: the last word was whole
    assert finish_answer(words[0], False) == ("", False)
    stage2 = dict(identity=IDENTITY, leak_ngrams=set(), leak_n=8, instruction="")
    short, min_chars = text, len(text) + rng.randint(1, 50)
    assert answer_reject_reason(short, min_chars=min_chars, complete=True, **stage2) == "too short"
    assert answer_reject_reason(short, min_chars=min_chars, complete=False, **stage2) is None
    assert answer_reject_reason(short, min_chars=min_chars, **stage2) == "too short"  # complete by default
    assert answer_reject_reason("", min_chars=0, complete=False, **stage2) == "empty"
    stage4 = SimpleNamespace(config=SimpleNamespace(verbose=SimpleNamespace(min_chars=min_chars)))
    assert finetune.verbose_response(stage4, short, complete=True, instruction="") == (short + TERMINATOR, None)
    assert finetune.verbose_response(stage4, short + " x", complete=False, instruction="") == (None, "too short")
    assert verbose_reject_reason(short + "!" * min_chars, complete=False, min_chars=min_chars, instruction="") is None
    instruction = " ".join(rng.sample(vocabulary, 4)) + "?"  # more than 16 characters
    copy = f"You asked: {instruction} " + text
    assert answer_reject_reason(copy, min_chars=0, **{**stage2, "instruction": instruction}) == "copies the instruction"
    assert verbose_reject_reason(copy, complete=True, min_chars=0, instruction=instruction) == "copies the instruction"
    assert (
        answer_reject_reason(f"Why {words[0]}? " + text, min_chars=0, **{**stage2, "instruction": f"Why {words[0]}?"})
        is None
    )


def test_stage2_bans_sorry_on_the_answers_first_token_not_the_thoughts(tmp_path):
    """The generation config that reaches stage 2's generator bans "Sorry" right after the answer marker, the one
    the rules prefix's exemplars use before their answers, whatever the prompt name."""
    reached = []

    class Recording:
        def __init__(self, model, tokenizer, config, progress=None):
            reached.append(config)

        def generate_with_status(self, prefix, prompts, **kwargs):
            reached.append(prefix)
            return [("", True)] * len(prompts)

    for name in ("Nova", "Ziggurat"):
        out = tmp_path / name
        write_jsonl(out / "stage1.jsonl", [{"id": "q", "source": "seed", "instruction": "Name a river in Spain."}])
        config = {"model": "tiny-random", "output_dir": str(out), "progress": False, "answers": {"prompt_name": name}}
        answers.write_answers(Session(from_mapping(SelfAlignConfig, config), make_generator=Recording))
        generation, prefix = reached[-2:]
        assert generation.first_token_bans == ("Sorry",) and generation.bans_after == f"### {name}\n"
        assert prefix.count(f"\n\n### {name}\n") == 5  # each exemplar's answer follows exactly this marker


def test_partial_sections_keep_their_paper_defaults():
    config = from_mapping(
        SelfAlignConfig, {"answers": {"generation": {"max_new_tokens": 5}}, "verbose": {"training": {"epochs": 2}}}
    )
    g = config.answers.generation
    assert (g.max_new_tokens, g.do_sample, g.temperature, g.top_p) == (5, True, 0.5, 0.95)
    assert g.stop_strings == ("### User",) and g.first_token_bans == ("Sorry",)
    assert config.verbose.generation.ngram_penalties == {3: 1.0, 4: 2.0}
    assert (config.verbose.training.epochs, config.verbose.training.cutoff) == (2, 768)
    assert config.engraving.optimizer.lr == 4e-4 and config.engraving.lora.r == 16


# ---- generation constraints ------------------------------------------------------------------------------------
def test_first_token_ban_and_ngram_frequency_penalty():
    scores = torch.zeros(2, 10)
    ban = FirstTokenBan([3, 5], prompt_width=4)
    assert torch.isinf(ban(torch.zeros(2, 4, dtype=torch.long), scores.clone())[:, [3, 5]]).all()
    assert not torch.isinf(ban(torch.zeros(2, 5, dtype=torch.long), scores.clone())).any()  # later tokens free
    # generated so far (after a 2-token prompt): 1 2 3 1 2 3 1 2 -> the 3-gram (1, 2, 3) occurred twice
    ids = torch.tensor([[9, 9, 1, 2, 3, 1, 2, 3, 1, 2]])
    out = NGramFrequencyPenalty(3, 1.5, prompt_width=2)(ids, torch.zeros(1, 10))
    assert out[0, 3] == -3.0 and (out[0, torch.arange(10) != 3] == 0).all()
    out = NGramFrequencyPenalty(4, 2.0, prompt_width=2)(ids, torch.zeros(1, 10))  # (3, 1, 2) -> 3 once
    assert out[0, 3] == -2.0 and out.abs().sum() == 2.0
    prompt_only = NGramFrequencyPenalty(3, 1.0, prompt_width=9)(ids, torch.zeros(1, 10))
    assert prompt_only.abs().sum() == 0  # the prompt's n-grams do not count


def test_banned_first_word_never_starts_a_generation(tiny):
    model, tokenizer = tiny
    config = from_mapping(SelfAlignConfig, {}).answers.generation
    free = HFGenerator(model, tokenizer, type(config)(max_new_tokens=1, stop_strings=()))
    first = free.generate("System: hi.", ["a", "b c"])
    banned_word = first[0].strip() or "x"
    banned = HFGenerator(
        model, tokenizer, type(config)(max_new_tokens=1, stop_strings=(), first_token_bans=(banned_word,))
    )
    assert banned.generate("System: hi.", ["a"])[0].strip() != banned_word


# ---- fused SFT loss --------------------------------------------------------------------------------------------
def test_packed_fused_loss_equals_transformers_loss_and_gradient(tiny):
    """Prompt masked, no EOS: -mean log p over response tokens from packed rows with the fused kernels equals
    model(input_ids, labels=...).loss on the padded batch, and so do all parameter gradients (fp32, 1e-5)."""
    model, tokenizer = tiny
    model = model.float().train()
    pairs = [
        ("### User\nHi there\n\n### Bot\n", "Hello! How can I help?" + TERMINATOR),
        ("### User\nName three fruits.\n\n### Bot\n", "Apples, pears and plums."),
        ("S", "A much longer answer that goes on for quite a few tokens to make rows ragged. " * 2),
    ]
    sequences = [tokenize_pair(tokenizer, p, r, cutoff=120) for p, r in pairs]
    rows = pack(sequences, 90)
    assert len(rows) == 2  # packed without padding, more than one row
    count = sum(len(s.ids) - s.first_target for s in sequences)
    ours = -sum(packed_logprobs(model, row).sum() for row in rows) / count
    width = max(len(s.ids) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sequences):
        ids[r, : len(s.ids)] = torch.tensor(s.ids)
        labels[r, s.first_target : len(s.ids)] = torch.tensor(s.ids[s.first_target :])
        mask[r, : len(s.ids)] = 1
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    upstream = torch.rand(())  # a random scale on the loss
    for g, h in zip(
        torch.autograd.grad(ours * upstream, params), torch.autograd.grad(theirs * upstream, params), strict=True
    ):
        assert (g - h).abs().max() <= 1e-5 * h.abs().max() + 1e-8


def test_mc_scores_equal_full_logits(tiny):
    model, tokenizer = tiny
    prompts, continuations = ["Is the sky blue? It is", "Two plus two is"], [" true", " four or maybe five"]
    ours = continuation_logprobs(model, tokenizer, prompts, continuations)
    for prompt, cont, value in zip(prompts, continuations, ours, strict=True):
        s = tokenize_pair(tokenizer, prompt, cont, cutoff=100)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([s.ids])).logits[0].double(), -1)
        expected = sum(logp[t - 1, s.ids[t]].item() for t in range(s.first_target, len(s.ids)))
        assert abs(value - expected) < 1e-4
    items = load_items(ROOT / "sami_kernels" / "data" / "self_align" / "mc_hhh.jsonl", "hhh")
    swapped = [{**i, "a": i["b"], "b": i["a"], "better": "b" if i["better"] == "a" else "a"} for i in items]
    # both orders are asked, so swapping the replies' labels cannot change the accuracy
    assert hhh_accuracy(model, tokenizer, items, system="", name="Bot") == hhh_accuracy(
        model, tokenizer, swapped, system="", name="Bot"
    )


# ---- SFT order -------------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def sft_batches(monkeypatch, out, sequences, tokenizer, *, seed, kill_at=None):
    """sft_train on the tiny model; returns the batches it trained on (each a list of token-id tuples) and the
    logged losses. kill_at: the run dies as that step begins (its checkpoints up to there stay)."""
    seen = []

    def recording_pack(chunk, pack_tokens):
        if len(seen) == kill_at:
            raise Killed
        seen.append([tuple(s.ids) for s in chunk])
        return pack(chunk, pack_tokens)

    monkeypatch.setattr(sft, "pack", recording_pack)
    config = from_mapping(
        sft.SFTConfig, {"epochs": 2, "batch_sequences": 4, "pack_tokens": 512, "cutoff": 64, "checkpoint_every": 1}
    )
    try:
        sft.sft_train(out, tiny_random_path(), sequences, config, tokenizer, seed=seed, show=False, desc="sft")
    except Killed:
        pass
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return seen, losses


def test_sft_order_is_shuffled_by_the_seed_per_epoch_and_exact_across_a_resume(tmp_path, monkeypatch, tiny):
    _, tokenizer = tiny
    rng = random.Random(7)
    words = "tea river lamp quiet orbit maple salt window copper drift".split()
    pairs = [
        (f"Q{k}: " + " ".join(rng.choices(words, k=rng.randint(2, 9))), " " + " ".join(rng.choices(words, k=9)))
        for k in range(18)
    ]
    sequences = [tokenize_pair(tokenizer, p, r, cutoff=64) for p, r in pairs]
    given = [tuple(s.ids) for s in sequences]
    batches, losses = sft_batches(monkeypatch, tmp_path / "whole", sequences, tokenizer, seed=11)
    assert len(batches) == 2 * 5 and [len(b) for b in batches[:5]] == [4, 4, 4, 4, 2]
    epochs = [[ids for b in batches[5 * e : 5 * e + 5] for ids in b] for e in (0, 1)]
    assert all(sorted(order) == sorted(given) for order in epochs)  # every sequence once per epoch
    assert epochs[0] != given and epochs[1] != epochs[0]  # shuffled, and afresh each epoch
    other, _ = sft_batches(monkeypatch, tmp_path / "other-seed", sequences, tokenizer, seed=12)
    assert other != batches
    kill_at = rng.choice([s for s in range(1, 10) if s % 5])  # a step inside an epoch
    before, _ = sft_batches(monkeypatch, tmp_path / "killed", sequences, tokenizer, seed=11, kill_at=kill_at)
    after, resumed_losses = sft_batches(monkeypatch, tmp_path / "killed", sequences, tokenizer, seed=11)
    assert before + after == batches  # the resumed run sees exactly the uninterrupted order
    assert resumed_losses == pytest.approx(losses, rel=1e-6)


def test_engraving_and_cloning_are_seeded_by_the_config_seed_and_their_stage(tmp_path, monkeypatch):
    records = [{"id": f"q{k}", "instruction": f"Question {k}?", "response": "An answer. " * (k + 1)} for k in range(3)]
    seeds = []

    def recording_sft_train(out, *args, seed, **kwargs):
        seeds.append(seed)
        return out / "model"

    monkeypatch.setattr(finetune, "sft_train", recording_sft_train)
    for config_seed in (0, 1):
        out = tmp_path / str(config_seed)
        write_jsonl(out / "stage2.jsonl", records)
        write_jsonl(out / "stage4.log.jsonl", [{"unit": r["id"], "record": r} for r in records])  # answers done
        (out / "stage3" / "model").mkdir(parents=True)
        session = Session(
            from_mapping(
                SelfAlignConfig,
                {"model": "tiny-random", "output_dir": str(out), "progress": False, "seed": config_seed},
            )
        )
        finetune.engrave(session)
        finetune.verbose_clone(session)
    assert len(set(seeds)) == 4  # stage 3 and stage 4 differ, and both follow the config seed


# ---- all stages ------------------------------------------------------------------------------------------------
class WellFormed(HFGenerator):
    """The tiny random model really generates (through the shared rules prefix and its cache); its text is then
    wrapped in the thoughts / answer format a trained model would write, so that the filters keep some."""

    calls = 0

    def generate_with_status(self, prefix, prompts, **kwargs):
        WellFormed.calls += 1
        out = super().generate_with_status(prefix, prompts, **kwargs)
        if not prompts or "(internal thoughts)" not in prompts[0]:
            return out
        return [  # complete or not by the prompt alone, so an item's output does not depend on its batch
            (f"{IDENTITY} I should follow rules 2 (informative).\n\n### Nova\nHere is my answer:{t}", len(p) % 2 == 0)
            for p, (t, _) in zip(prompts, out, strict=True)
        ]


def tiny_config(out) -> dict:
    sft = {
        "batch_sequences": 8,
        "pack_tokens": 512,
        "cutoff": 200,
        "checkpoint_every": 1,
        "optimizer": {"lr": 1e-3, "warmup_steps": 1},
    }
    return {
        "model": "tiny-random",
        "output_dir": str(out),
        "progress": False,
        "prompts": {"self_instruct": 3, "max_requests": 2, "types": 2, "generation": {"max_new_tokens": 16}},
        "answers": {"min_chars": 20, "generation": {"max_new_tokens": 12, "batch_size": 8}},
        "engraving": sft,
        "verbose": {"min_chars": 20, "generation": {"max_new_tokens": 40, "batch_size": 8}, "training": sft},
    }


def test_every_stage_end_to_end_and_resumable(tmp_path):
    config = from_mapping(SelfAlignConfig, tiny_config(tmp_path))
    report = run_self_align(config, make_generator=WellFormed)
    stage1 = [json.loads(line) for line in (tmp_path / "stage1.jsonl").read_text().splitlines()]
    assert {r["source"] for r in stage1} >= {"seed", "tgrt-seed"} and len({r["id"] for r in stage1}) == len(stage1)
    assert report["1"]["seeds"] + report["1"].get("kept", 0) == len(stage1)
    stage2 = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    assert stage2 and all("Nova" not in r["response"] for r in stage2)
    assert any(r["response"].endswith(TERMINATOR) for r in stage2) and not all(
        r["response"].endswith(TERMINATOR) for r in stage2
    )
    assert report["2"]["generated"] == len(stage1) and report["2"]["kept"] == len(stage2)
    assert (tmp_path / "stage3" / "model" / "adapter_config.json").exists()  # LoRA by default
    adapter = json.loads((tmp_path / "stage3" / "model" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"] and adapter["r"] == 16
    assert (tmp_path / "stage4" / "model" / "adapter_model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "stage3" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == -(-len(stage2) // 8) and all(loss > 0 for loss in losses)
    results = json.loads((tmp_path / "eval.json").read_text())
    assert set(results) == {"base", "stage3", "stage4", "items"}
    accuracies = [v for m in ("base", "stage3", "stage4") for k, v in results[m].items() if k.endswith("accuracy")]
    assert len(accuracies) >= 3 and all(0 <= v <= 1 for v in accuracies)  # the metrics: test_self_align_eval.py

    calls, before = WellFormed.calls, {p.name: p.read_bytes() for p in tmp_path.glob("stage*.jsonl")}
    for stage in ("1", "2", "3", "4"):  # everything done: nothing is generated again (eval always runs afresh)
        run_self_align(config, stage, make_generator=WellFormed)
    assert WellFormed.calls == calls
    assert before == {p.name: p.read_bytes() for p in tmp_path.glob("stage*.jsonl")}

    log = (tmp_path / "stage2.log.jsonl").read_text().splitlines()
    torn = '[{"unit": "half-writ'  # as if killed after the first batch, in the middle of the next append
    (tmp_path / "stage2.log.jsonl").write_text(log[0] + "\n" + torn)
    run_self_align(config, "2", make_generator=WellFormed)
    resumed = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    first_batch = [e["record"]["id"] for e in json.loads(log[0]) if "record" in e]
    assert [r["id"] for r in resumed[: len(first_batch)]] == first_batch
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in stage2)
    reloaded = StageFile(tmp_path, "2")  # the torn line was cut off, so the appends after it are read back too
    assert sorted(r["id"] for r in reloaded.records) == sorted(r["id"] for r in stage2)


def killed_mid_append(monkeypatch, at_save: int, fraction: float) -> None:
    """StageFile.save dies in its `at_save`-th append, leaving only `fraction` of the appended bytes on disk."""
    real_save, saves = StageFile.save, []

    def dying_save(self):
        before = self.log_path.stat().st_size if self.log_path.exists() else 0
        real_save(self)
        after = self.log_path.stat().st_size if self.log_path.exists() else 0
        saves.extend([after] if after > before else [])
        if len(saves) == at_save:
            with open(self.log_path, "r+b") as f:
                f.truncate(before + int((after - before) * fraction))
            raise Killed

    monkeypatch.setattr(StageFile, "save", dying_save)


def test_a_killed_run_resumed_with_another_batch_size_writes_what_an_uninterrupted_run_writes(tmp_path, monkeypatch):
    """Sampling (temperature 1) with the tiny model; stage 1 killed in its first append and stage 2 in its second
    (part of each batch's bytes reached the disk), stage 2 resumed with another batch size: both stages' outputs are
    byte-identical to an uninterrupted run's."""
    rng = random.Random(9)

    def config(out, batch_size: int):
        c = tiny_config(out)
        c["prompts"]["generation"]["temperature"] = 1.0
        c["answers"] = {
            "max_queries": 14,
            "generation": {"max_new_tokens": 8, "batch_size": batch_size, "temperature": 1.0},
        }
        return from_mapping(SelfAlignConfig, c)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for stage in ("1", "2"):
        run_self_align(config(whole, 4), stage, make_generator=WellFormed)
    for stage, at_save, resumed_batch in (("1", 1, 4), ("2", 2, 3)):
        with monkeypatch.context() as m:
            killed_mid_append(m, at_save, rng.uniform(0.3, 0.8))
            with pytest.raises(Killed):
                run_self_align(config(killed, 4), stage, make_generator=WellFormed)
        run_self_align(config(killed, resumed_batch), stage, make_generator=WellFormed)
        for name in (f"stage{stage}.jsonl", f"stage{stage}.counts.json"):
            assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    assert len((whole / "stage2.jsonl").read_text().splitlines()) > 4  # answers past the cut batch were compared


def test_cli_stage_order_and_a_random_model_filtered_out(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: tiny-random\noutput_dir: {tmp_path / 'run'}\nprogress: false\n")
    result = subprocess.run(
        [sys.executable, "-m", "sami_kernels", "self-align", "--config", str(config), "--stage", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "run stage 2 first" in result.stderr and "Traceback" not in result.stderr
    args = [
        "--set",
        "prompts.types=1",
        "--set",
        "prompts.max_requests=1",
        "--set",
        "answers.generation.max_new_tokens=8",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "sami_kernels", "self-align", "--config", str(config), "--stage", "all", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "stage 2 kept no answers" in result.stderr
    counts = json.loads((tmp_path / "run" / "stage2.counts.json").read_text())["counts"]
    assert counts["dropped: no identity sentence"] == counts["generated"] > 0  # a random model has no thoughts
