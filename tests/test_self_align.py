"""SELF-ALIGN: the text filters, the generation constraints, the fused packed SFT loss against transformers' own
loss, multiple-choice scoring against full logits, and every stage end to end on the tiny random model
(resumable, with counts per filter reason)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sami_kernels.engine.generation import FirstTokenBan, HFGenerator, NGramFrequencyPenalty
from sami_kernels.engine.models import tiny_random_path
from sami_kernels.engine.packed import continuation_logprobs, pack, packed_logprobs, tokenize_pair
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.self_align.config import IDENTITY, TERMINATOR, SelfAlignConfig
from sami_kernels.recipes.self_align.evaluation import hhh_accuracy, load_items
from sami_kernels.recipes.self_align.loop import run_self_align
from sami_kernels.recipes.self_align.stage_file import StageFile
from sami_kernels.recipes.self_align.text import (
    NearDuplicates,
    cut_repeated_clause,
    instruction_reject_reason,
    parse_numbered,
    principled_response,
    topic_reject_reason,
    word_ngrams,
)

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
    )
    thoughts = f"{IDENTITY} The user asks about tea. I should follow rules 2 (informative).\n\n### Nova\n"
    answer = "Green tea is steamed or pan-fired soon after picking, which stops oxidation. Nova hopes this helps."
    response, reason = principled_response(thoughts + answer, complete=True, **kwargs)
    assert reason is None and response == answer.replace("Nova", "Dromedary") + TERMINATOR
    assert principled_response(thoughts + answer, complete=False, **kwargs)[0] == answer.replace("Nova", "Dromedary")
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


def test_bad_mc_items_name_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(
        '{"question": "q", "answer": "a", "label": true}\n{"question": "q", "answer": "a", "label": "yes"}\n'
    )
    with pytest.raises(ValueError, match=r"items.jsonl:2: truthful items need 'label' of type bool"):
        load_items(path, "truthful")


# ---- all stages ------------------------------------------------------------------------------------------------
class WellFormed(HFGenerator):
    """The tiny random model really generates (through the shared rules prefix and its cache); its text is then
    wrapped in the thoughts / answer format a trained model would write, so that the filters keep some."""

    calls = 0

    def generate_with_status(self, prefix, prompts):
        WellFormed.calls += 1
        out = super().generate_with_status(prefix, prompts)
        if not prompts or "(internal thoughts)" not in prompts[0]:
            return out
        return [
            (f"{IDENTITY} I should follow rules 2 (informative).\n\n### Nova\nHere is my answer:{t}", k % 2 == 0)
            for k, (t, _) in enumerate(out)
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
    assert all(0 <= results[m]["truthful_mc_accuracy"] <= 1 for m in ("base", "stage3", "stage4"))

    calls, before = WellFormed.calls, {p.name: p.read_bytes() for p in tmp_path.glob("stage*.jsonl")}
    run_self_align(config, make_generator=WellFormed)  # everything done: nothing is generated again
    assert WellFormed.calls == calls
    assert before == {p.name: p.read_bytes() for p in tmp_path.glob("stage*.jsonl")}

    log = (tmp_path / "stage2.log.jsonl").read_text().splitlines()
    cut = [k for k, line in enumerate(log) if "record" in json.loads(line)][1] + 1
    torn = '{"unit": "half-writ'  # as if killed after the second kept answer, in the middle of the next append
    (tmp_path / "stage2.log.jsonl").write_text("\n".join(log[:cut]) + "\n" + torn)
    run_self_align(config, "2", make_generator=WellFormed)
    resumed = [json.loads(line) for line in (tmp_path / "stage2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in resumed[:2]] == [r["id"] for r in stage2[:2]]
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in stage2)
    reloaded = StageFile(tmp_path, "2")  # the torn line was cut off, so the appends after it are read back too
    assert sorted(r["id"] for r in reloaded.records) == sorted(r["id"] for r in stage2)


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
