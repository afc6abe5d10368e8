"""Pair engine: M and every trainable parameter's gradient equal the naive computation (Hugging Face forward over
the N^2 padded sequences with full logits, log_softmax, gather, mean over response tokens), for tiny random
Llama / Mistral / Qwen2 / GPT-2 models, N in {2, 3, 4}, ragged lengths, each way of sharing prefixes."""

import pytest
import torch
import transformers
from helpers import assert_close_to_ref

import sami_kernels as sk
from sami_kernels.engine.pairs import PairBatch

VOCAB, BOS = 97, 1


def tiny_model(arch: str, dtype=torch.float32):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=2,
    )
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**common),  # q/k/v biases
        "gpt2": lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=BOS,
            eos_token_id=2,
        ),  # tied embeddings, absolute positions
    }
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[arch]()).to(dtype)


def random_batch(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    prompts = [[[BOS, *tokens(rand(2, 12))] for _ in range(N)] for _ in range(B)]
    responses = [[tokens(rand(1, 8)) for _ in range(N)] for _ in range(B)]
    return PairBatch(prompts, responses, [[r] * N for r in responses])


naive_matrix = sk.reference.pair_logprobs_naive


def grads(model, M, upstream):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(M, params, upstream)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("N", [2, 3, 4])
@pytest.mark.parametrize("way", ["cache", "tree", "no-sharing"])
def test_matrix_and_every_gradient_equal_naive(arch, N, way):
    model = tiny_model(arch)
    batch = random_batch(2, N, seed=N)
    upstream = torch.randn(2, N, N)
    kwargs = dict(prefix_sharing=False) if way == "no-sharing" else dict(attn=way)
    M = sk.pair_logprobs(model, batch, **kwargs)
    M_ref = naive_matrix(model, batch)
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(model, M, upstream), grads(model, M_ref, upstream), strict=True):
        scale = g_ref.abs().max().item()
        assert (g - g_ref).abs().max().item() <= 1e-5 * scale + 1e-7


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_model_gradient_checkpointing_and_train_mode():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    lora = peft.get_peft_model(model, config)
    batch = random_batch(2, 3, seed=5)
    upstream = torch.randn(2, 3, 3)
    lora.eval()
    M_ref = naive_matrix(lora, batch)
    ref = grads(lora, M_ref, upstream)
    assert len(ref) == 2 * 4 * 2  # A and B of 4 projections in 2 layers: the base weights are frozen
    lora.train()
    lora.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    M = sk.pair_logprobs(lora, batch)  # auto picks the tree mask: checkpointing drops KV caches
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(lora, M, upstream), ref, strict=True):
        assert (g - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item() + 1e-7
    with pytest.raises(ValueError, match="no KV cache"):
        sk.pair_logprobs(lora, batch, attn="cache")


def test_bfloat16_model_within_torch_bfloat16_error():
    model = tiny_model("llama")
    batch = random_batch(2, 2, seed=3)
    ref64 = naive_matrix(model.double(), batch)
    model = model.to(torch.bfloat16)
    M = sk.pair_logprobs(model, batch)
    assert M.dtype == torch.float32
    assert_close_to_ref(M, ref64, naive_matrix(model, batch), dtype=torch.bfloat16, name="M")


def test_sami_step_loss_is_infonce_of_the_matrix():
    model = tiny_model("qwen2")
    batch = random_batch(3, 2, seed=7)
    loss, M = sk.sami_step_loss(model, batch, direction="col")
    assert loss.item() == pytest.approx(sk.reference.infonce_loss(M.double(), direction="col").item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class CharTokenizer:
    """A tokenizer with one token per character (ids 3..), BOS = 1; merges "ab" into one token when asked."""

    bos_token_id = BOS

    def __init__(self, merge_ab=False):
        self.merge_ab = merge_ab

    def __call__(self, text, add_special_tokens=False):
        ids = [3 + ord(c) % 90 for c in (text.replace("ab", "\x00") if self.merge_ab else text)]
        return type("Encoding", (), {"input_ids": ids})()


def test_from_texts_layout_and_joint_tokenisation():
    tok = CharTokenizer()
    batch = PairBatch.from_texts(
        tok,
        ["q1", "q22"],
        ["be kind", "be rude"],
        [["yes", "no"], ["ok", "go away"]],
        template="{constitution}|{query}:",
    )
    assert batch.num_queries == 2 and batch.num_constitutions == 2
    assert batch.prompt_ids[1][0] == [BOS, *tok("be kind|q22:").input_ids]
    assert batch.response_ids[0][1] == tok("no").input_ids
    assert batch.pair_ids[1][0][1] == batch.response_ids[1][1]
    joint = PairBatch.from_texts(tok, ["q"], ["c1", "c2"], [["yes", "no"]], joint_tokenization=True)
    assert joint.pair_ids[0][1][0] == tok("yes").input_ids
    with pytest.raises(ValueError, match="query 0, constitution 0, response 0: a token merges across"):
        PairBatch.from_texts(
            CharTokenizer(merge_ab=True), ["q"], ["c", "d"], [["b!", "x"]], template="{query}a", joint_tokenization=True
        )


def test_bad_input_names_the_query_and_response():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="query 1: expected 2 constitutions and 2 responses"):
        PairBatch.from_texts(tok, ["a", "b"], ["c1", "c2"], [["x", "y"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="query 0, response 1 is empty"):
        PairBatch.from_texts(tok, ["a"], ["c1", "c2"], [["x", ""]])
    with pytest.raises(ValueError, match="N >= 2"):
        PairBatch.from_texts(tok, ["a"], ["c1"], [["x"]])
    no_bos = CharTokenizer()
    no_bos.bos_token_id = None
    no_bos_batch = PairBatch.from_texts(no_bos, ["a"], ["c1", "c2"], [["x", "y"]], template="{constitution}{query}")
    assert no_bos_batch.prompt_ids[0][1] == no_bos("c2a").input_ids  # a tokenizer without BOS: none prepended
    with pytest.raises(ValueError, match="query 0: a prompt is empty after tokenisation"):
        PairBatch.from_texts(no_bos, [""], ["", "c"], [["x", "y"]], template="{constitution}{query}")
    long_batch = PairBatch.from_texts(tok, ["a"], ["c" * 120, "c2"], [["x" * 20, "y"]])
    with pytest.raises(
        ValueError, match="query 0, constitution 0, response 0: 171 tokens exceed the model.s maximum of 128"
    ):
        sk.pair_logprobs(tiny_model("llama"), long_batch)
    with pytest.raises(ValueError, match="attn must be"):
        sk.pair_logprobs(tiny_model("llama"), random_batch(1, 2), attn="flash")


def test_logit_scale_is_honoured_and_soft_capping_refused():
    model = tiny_model("llama")
    batch = random_batch(1, 2, seed=11)
    reference = naive_matrix(model, batch)  # Llama's own head ignores logit_scale: scale the reference by hand
    model.config.logit_scale = 2.0
    scaled = sk.pair_logprobs(model, batch)
    B, N = 1, 2
    seqs = [(batch.prompt_ids[0][i], batch.pair_ids[0][i][j]) for i in range(N) for j in range(N)]
    expected = []
    for p, r in seqs:
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float() * 2.0
        logp = torch.log_softmax(logits[len(p) - 1 : -1], -1)
        expected.append(logp.gather(-1, torch.tensor(r)[:, None]).mean())
    torch.testing.assert_close(scaled, torch.stack(expected).view(B, N, N), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scaled, reference)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps its logits"):
        sk.pair_logprobs(model, batch)
