"""The engine's tokenisation and sampling contract (engine/tokens.py, generation.py, packed.py, pairs.py): per-row
sampling seeds, the first-token ban after a marker, generation ids equal to encode(prefix + prompt), and scored ids
equal to the tail of encode(prompt + answer), on a byte-level BPE (SmolLM2's real tokenizer) and on a
SentencePiece-style tokenizer (Metaspace "▁") built here."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sami_kernels.engine.generation import FirstTokenBan, GenerationConfig, HFGenerator
from sami_kernels.engine.models import resolve_model_path


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model_path("tiny-random")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---- A: per-row sampling seeds ---------------------------------------------------------------------------------
def test_seeded_row_is_the_same_in_any_batch_and_under_any_global_seed(tiny):
    model, tokenizer = tiny
    config = GenerationConfig(max_new_tokens=12, batch_size=2, do_sample=True, temperature=1.0, stop_strings=())
    generator = HFGenerator(model, tokenizer, config)
    prefix = "System: be brief.\n\nHuman:"
    prompts = [" How do I keep basil fresh?", " hi", " Name three rivers in Europe, please.", " Why?"]
    seeds = torch.randint(0, 2**31, (len(prompts),)).tolist()
    together = generator.generate(prefix, prompts, seeds=seeds)
    torch.manual_seed(12345)  # the global RNG must not matter
    reordered = generator.generate(prefix, prompts[::-1], seeds=seeds[::-1])[::-1]
    torch.manual_seed(777)
    alone = [generator.generate(prefix, [p], seeds=[s])[0] for p, s in zip(prompts, seeds, strict=True)]
    assert together == reordered == alone
    assert len(set(together)) == len(prompts)  # really sampled text, not one greedy string
    other_seeds = [s + 1 for s in seeds]
    assert all(a != b for a, b in zip(together, generator.generate(prefix, prompts, seeds=other_seeds), strict=True))
    with pytest.raises(ValueError, match=r"seeds: expected one per prompt \(4\), got 3"):
        generator.generate(prefix, prompts, seeds=seeds[:3])


# ---- B: the first-token ban after a marker ---------------------------------------------------------------------
def test_ban_after_marker_hits_only_the_token_after_its_first_end():
    text_of = {5: "### Nova\n", 6: "x", 7: "y", 8: "### No", 9: "va\n"}
    decode = lambda ids: "".join(text_of[int(t)] for t in ids)  # noqa: E731
    ban = FirstTokenBan([3, 4], prompt_width=2, after="### Nova\n", decode=decode)
    prompt = [[1, 1], [1, 1]]
    banned_steps = []
    for generated in ([], [6], [6, 5], [6, 5, 6], [6, 5, 6, 5]):  # row 1 reaches the marker in two tokens
        other = [6, 8, 9, 7][: len(generated)]
        ids = torch.tensor([prompt[0] + generated, prompt[1] + other])
        scores = ban(ids, torch.randn(2, 10))
        banned_steps.append([bool(torch.isinf(scores[r, [3, 4]]).all()) for r in range(2)])
        assert not torch.isinf(scores[:, [0, 1, 2, 5, 6, 7, 8, 9]]).any()
    # row 0: after [6, 5] (the marker's first end) only, not after its second end; row 1: after [6, 8, 9]
    assert banned_steps == [[False, False], [False, False], [True, False], [False, True], [False, False]]


def test_generation_bans_the_answer_first_token_not_the_first_generated_token(tiny):
    model, tokenizer = tiny
    prefix, prompt = "System: be brief.\n\nHuman:", " hi"
    free = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=10, stop_strings=()))
    ids = [tokenizer.bos_token_id, *tokenizer(prefix + prompt, add_special_tokens=False).input_ids]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids) :]
    assert free.generate(prefix, [prompt])[0] == tokenizer.decode(out)
    words = [tokenizer.decode(out[k : k + 1]) for k in range(5)]
    assert all(tokenizer(w, add_special_tokens=False).input_ids == [int(out[k])] for k, w in enumerate(words))
    cut = int(torch.randint(2, 5, ()))  # the marker: the text of the first `cut` generated tokens
    marker = tokenizer.decode(out[:cut])
    config = GenerationConfig(max_new_tokens=10, stop_strings=(), first_token_bans=(words[cut], words[0]))
    banned_after = HFGenerator(model, tokenizer, GenerationConfig(**{**vars(config), "bans_after": marker}))
    text = banned_after.generate(prefix, [prompt])[0]
    assert text.startswith(marker) and not text[len(marker) :].startswith(words[cut])  # token 1 free, token cut+1 not
    banned_first = HFGenerator(model, tokenizer, config).generate(prefix, [prompt])[0]  # bans_after "": token 1
    assert not banned_first.startswith(words[0])


# ---- the two tokenizer families --------------------------------------------------------------------------------
SENTENCES = [
    "System: be kind and brief.",
    "Human: How do I keep basil fresh? Why is the sky blue? Name three rivers in Europe, please.",
    "Assistant: Sure, trim the stems and keep them in water. Sure thing, the sky scatters blue light.",
    "### User\nWhat is a good way to study?\n\n### Bot\nSure, study a little every day.",
    "Say hello to the world, hello again, hello there. Rivers: Rhine, Danube, Seine.",
]


def sentencepiece_style_tokenizer():
    """A BPE with Metaspace("▁", prepend_scheme="first") pre-tokenizer and decoder, bos <s>, eos </s>, as Llama's;
    "\n" is a token of its own that merges with nothing (Llama's byte token <0x0A>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace("▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=["\n"], show_progress=False
    )
    bpe.train_from_iterator([s.replace("\n", " ") for s in SENTENCES] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["smollm2", "sentencepiece"])
def tokenizer(request):
    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    return sentencepiece_style_tokenizer()


def rule(tokenizer, text):
    """The engine's encode rule, written out: ids of text, BOS prepended unless they start with it."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id, *ids]


def tiny_llama(tokenizer):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def random_prompts(count):
    """Prompts starting with a letter, random words from the sentences above."""
    words = " ".join(SENTENCES).replace("\n", " ").split()
    picks = [torch.randint(0, len(words), (int(torch.randint(1, 6, ())),)).tolist() for _ in range(count)]
    return [" ".join(words[k] for k in pick).lstrip("#:") + "\n\nAssistant:" for pick in picks]


def ids_fed_to_the_model(model, monkeypatch):
    """Spy: per generated row, the ids the model receives: the prefix pass's first `cached` ids (the cache handed
    to generate) followed by the row's unmasked ids after them."""
    prefix_passes, rows, inside = [], [], []
    forward, generate = model.forward, model.generate

    def spy_forward(input_ids=None, **kwargs):
        if not inside:
            prefix_passes.append(input_ids[0].tolist())
        return forward(input_ids=input_ids, **kwargs)

    def spy_generate(input_ids, attention_mask, past_key_values, **kwargs):
        cached = 0 if past_key_values is None else past_key_values.get_seq_length()
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            assert ids[:cached] == prefix_passes[-1][:cached] and all(mask[:cached])
            rows.append(ids[:cached] + [t for t, m in zip(ids[cached:], mask[cached:], strict=True) if m])
        inside.append(True)
        try:
            return generate(input_ids, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(model, "generate", spy_generate)
    return rows


# ---- C: generation prompts tokenised at a token boundary -------------------------------------------------------
def test_generation_feeds_the_model_encode_of_prefix_plus_prompt(tokenizer, monkeypatch):
    model = tiny_llama(tokenizer)
    rows = ids_fed_to_the_model(model, monkeypatch)
    generator = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=2, batch_size=3, stop_strings=()))
    prefixes = ["System: be kind and brief.\n\nHuman: "]
    if tokenizer.bos_token == "<|im_start|>":  # chat-template text writes its own BOS
        prefixes.append("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nHuman: ")
    for prefix in prefixes:
        prompts = random_prompts(5)
        rows.clear()
        generator.generate(prefix, prompts)
        generator.generate(prefix, prompts[:2])  # the same prefix again: its cache is reused
        expected = [rule(tokenizer, prefix + p) for p in prompts + prompts[:2]]
        assert sorted(rows) == sorted(expected)
        apart = [rule(tokenizer, prefix) + tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        assert all(a != e for a, e in zip(apart, expected, strict=False))  # the old, split encoding differs
    assert generator.prefix_encodings == len(prefixes)


# ---- D: scored answers are the tail of encode(prompt + answer) -------------------------------------------------
def test_scored_answer_ids_are_the_tail_of_the_joint_encoding(tokenizer):
    from sami_kernels.engine.packed import tokenize_pair

    answers = ["Sure, trim the stems.", "Rivers: Rhine.", "Sure thing", "Say hello"]
    for query, answer in zip(random_prompts(len(answers)), answers, strict=True):
        prompt = f"### User\n{query}\n\n### Bot\n"
        seq = tokenize_pair(tokenizer, prompt, answer, cutoff=200)
        assert seq.ids == rule(tokenizer, prompt + answer) and seq.ids[: seq.first_target] == rule(tokenizer, prompt)
        alone = tokenizer(answer, add_special_tokens=False).input_ids
        if tokenizer.bos_token == "<s>":  # SentencePiece: alone the answer would start with a spurious "▁"
            assert seq.ids[seq.first_target :] != alone
    with pytest.raises(ValueError, match="merge across their boundary"):
        tokenize_pair(tokenizer, "### User\nhi\n\n### Bot: ", "Sure thing", cutoff=200)  # ':' '▁' vs ':' '▁Sure'


def test_pair_engine_scores_each_response_in_its_context(tokenizer):
    from sami_kernels.engine.pairs import PairBatch

    constitutions = ["be kind and brief.", "be brief."]
    responses = [" Sure, trim the stems.", " Rivers: Rhine, Danube."]
    template = "System: {constitution}\n\nHuman: {query}\n\nAssistant:"
    queries = [p.removesuffix("\n\nAssistant:") for p in random_prompts(2)]
    batch = PairBatch.from_texts(tokenizer, queries, constitutions, [responses] * 2, template=template)
    for b, query in enumerate(queries):
        for i, c in enumerate(constitutions):
            prompt = template.format(constitution=c, query=query)
            assert batch.prompt_ids[b][i] == rule(tokenizer, prompt)
            for j, response in enumerate(responses):
                assert batch.prompt_ids[b][i] + batch.pair_ids[b][i][j] == rule(tokenizer, prompt + response)
    with pytest.raises(ValueError, match="query 0, constitution 0, response 0: a token merges across"):
        PairBatch.from_texts(tokenizer, ["hi"], constitutions, [["Sure", "Sure"]], template="{constitution} {query} ")


def test_pair_engine_refuses_tails_that_differ_between_constitutions_unless_joint():
    from sami_kernels.engine.pairs import PairBatch

    tokenizer = sentencepiece_style_tokenizer()  # "▁" is prepended to the text's start only
    args = (tokenizer, [""], ["", "System: be kind.\n"], [["Sure thing", "Rivers"]])
    with pytest.raises(ValueError, match=r"query 0, response 0: .* differ .*joint_tokenization=True"):
        PairBatch.from_texts(*args, template="{constitution}{query}")
    joint = PairBatch.from_texts(*args, template="{constitution}{query}", joint_tokenization=True)
    for i, prompt in enumerate(["", "System: be kind.\n"]):
        for j, response in enumerate(["Sure thing", "Rivers"]):
            assert joint.prompt_ids[0][i] + joint.pair_ids[0][i][j] == rule(tokenizer, prompt + response)
    assert joint.pair_ids[0][0][0] != joint.pair_ids[0][1][0]
