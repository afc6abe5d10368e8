"""group_logprobs: per-token log-probs of B prompts' own lists of completions, every prompt encoded once, equal the
per-sequence full-logits computation (Hugging Face forward of prompt + completion, log_softmax of logits /
temperature, gather) in values and every trainable parameter's gradient under a random upstream gradient, on tiny
Llama / Mistral / Qwen2 / GPT-2, ragged lengths and group sizes, each attention way, LoRA under gradient
checkpointing; the no-gradient token statistics equal plain torch; bad inputs are refused by name."""

import pytest
import torch
from test_pairs import BOS, VOCAB, tiny_model

import sami_kernels as sk


def random_groups(seed: int, sizes=(3, 1, 4)):
    """Prompts of 2-12 tokens with 1-8-token completions, len(sizes) prompts with sizes[b] completions each."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts = [[BOS, *tokens(rand(1, 12))] for _ in sizes]
    completions = [[tokens(rand(1, 9)) for _ in range(n)] for n in sizes]
    return prompts, completions


def reference_tokens(model, prompts, completions, temperature=1.0) -> list[torch.Tensor]:
    """Per completion row: log softmax(logits / temperature) of its own full sequence, gathered at its tokens."""
    rows = []
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            rows.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0])
    return rows


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def assert_grads_close(ours, ref):
    assert len(ours) == len(ref) > 0
    for g, g_ref in zip(ours, ref, strict=True):
        assert (g - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item() + 1e-7


def check_against_reference(model, prompts, completions, *, temperature=1.0, **options):
    out = sk.group_logprobs(model, prompts, completions, temperature=temperature, **options)
    ref = reference_tokens(model, prompts, completions, temperature)
    lengths = [len(c) for group in completions for c in group]
    assert out.tokens.shape == (len(lengths), max(lengths)) and out.mask.sum(1).tolist() == lengths
    upstream = torch.randn(out.tokens.shape)  # random: each token's gradient weighted differently
    ref_padded = torch.zeros(out.tokens.shape)
    for r, row in enumerate(ref):
        torch.testing.assert_close(out.tokens[r, : len(row)], row, rtol=1e-5, atol=1e-5)
        assert (out.tokens[r, len(row) :] == 0).all()
        ref_padded = ref_padded.index_put((torch.full((len(row),), r), torch.arange(len(row))), row)
    torch.testing.assert_close(out.sums, torch.stack([r.sum() for r in ref]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.means, torch.stack([r.mean() for r in ref]), rtol=1e-5, atol=1e-5)
    sums_upstream = torch.randn(len(ref))
    ours = torch.autograd.grad((out.tokens * upstream).sum() + (out.sums * sums_upstream).sum(), trainable(model))
    theirs = torch.autograd.grad(
        (ref_padded * upstream).sum() + (torch.stack([r.sum() for r in ref]) * sums_upstream).sum(), trainable(model)
    )
    assert_grads_close(ours, theirs)
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("way", ["cache", "tree", "no-sharing"])
def test_tokens_sums_means_and_every_gradient_equal_full_sequences(arch, way):
    model = tiny_model(arch)
    prompts, completions = random_groups(seed=len(arch) + len(way))
    options = dict(prefix_sharing=False) if way == "no-sharing" else dict(attn=way)
    check_against_reference(model, prompts, completions, temperature=0.7, **options)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_under_gradient_checkpointing_equals_full_sequences():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
    )
    model = peft.get_peft_model(tiny_model("llama"), config)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    prompts, completions = random_groups(seed=11, sizes=(2, 5))
    check_against_reference(model, prompts, completions)  # auto: the tree mask (checkpointing drops KV caches)
    with pytest.raises(ValueError, match="no KV cache"):
        sk.group_logprobs(model, prompts, completions, attn="cache")


def test_token_statistics_equal_plain_torch():
    model = tiny_model("qwen2")
    prompts, completions = random_groups(seed=4)
    with torch.no_grad():  # one greedy completion, so that is_top1 is 1 somewhere
        ids = prompts[0][:]
        for _ in range(4):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    completions[0][0] = ids[len(prompts[0]) :]
    out = sk.group_logprobs(model, prompts, completions, temperature=1.3, stats=sk.TOKEN_STATS)
    r = 0
    for prompt, group in zip(prompts, completions, strict=True):
        for completion in group:
            with torch.no_grad():
                z = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1] / 1.3
            p = torch.softmax(z.double(), -1)
            n = len(completion)
            expected = {
                "entropy": -(p * p.log()).sum(-1),
                "mean_logits": z.double().mean(-1),
                "is_top1": (z.argmax(-1) == torch.tensor(completion)).double(),
                "log_sum_sq_probs": (p**2).sum(-1).log(),
            }
            for name, value in expected.items():
                assert not out.stats[name].requires_grad
                torch.testing.assert_close(out.stats[name][r, :n].double(), value, rtol=1e-5, atol=1e-5)
                assert (out.stats[name][r, n:] == 0).all()
            r += 1
    assert out.stats["is_top1"][0, :4].tolist() == [1.0] * 4


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([], [], "prompts must be a non-empty list"),
        ([[BOS, 5]], [[[4]], [[5]]], r"completions must hold one list of completions per prompt \(1\), got 2"),
        ([[BOS, 5], []], [[[4]], [[5]]], "prompt 1 is empty"),
        ([[BOS, 5]], [[]], "prompt 0 has no completion"),
        ([[BOS, 5]], [[[4], []]], "prompt 0, completion 1 is empty"),
        ([[BOS] * 120], [[[4] * 9]], "prompt 0, completion 0: 129 tokens exceed the model's maximum of 128"),
    ],
)
def test_bad_inputs_are_refused_by_name(prompts, completions, message):
    with pytest.raises(ValueError, match=message):
        sk.group_logprobs(tiny_model("llama"), prompts, completions)


def test_bad_options_are_refused_by_name():
    model = tiny_model("llama")
    prompts, completions = random_groups(seed=1)
    with pytest.raises(ValueError, match=r"stats must be among .* got \['perplexity'\]"):
        sk.group_logprobs(model, prompts, completions, stats=("perplexity",))
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sk.group_logprobs(model, prompts, completions, temperature=0)
