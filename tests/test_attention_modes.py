"""Attention modes of the pair engine: every cell of (attention implementation x attn x gradient checkpointing in
training mode) computes M and every parameter gradient as the naive N^2 full-logits computation does, or is refused
with a ValueError before any forward.

eager and sdpa run as they are. flash_attention_2 (no GPU, no flash-attn package here) runs through transformers' own
unpadding with reference_varlen below in place of flash_attn_varlen_func. flex_attention runs through torch's
unfused flex reference in place of the compiled kernel, forward only: torch 2.13 has no flex backward on the CPU
(NotImplementedError), and its compiled CPU flex kernel fails to build here (C++ compile error, segfault)."""

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
import transformers.masking_utils as hf_masks
import transformers.modeling_flash_attention_utils as hf_flash
from test_pairs import grads, naive_matrix, random_batch, tiny_model
from torch.nn.attention import flex_attention as torch_flex

import sami_kernels as sk
from sami_kernels.engine.groups import ATTN_IMPLEMENTATIONS, resolve_attn
from sami_kernels.recipes.training import enable_activation_checkpointing

REFUSED = "refused"
# (attn, checkpointing) -> (way with eager / sdpa / flex_attention, way with flash_attention_2)
WAYS = {
    ("cache", False): ("cache", "cache"),
    ("cache", True): (REFUSED, REFUSED),
    ("tree", False): ("tree", REFUSED),
    ("tree", True): ("tree", REFUSED),
    ("auto", False): ("cache", "cache"),
    ("auto", True): ("tree", REFUSED),
}
REFUSALS = {
    "cache": r"attn='cache' gets no KV cache under gradient checkpointing",
    "tree": r"attn='tree' needs an additive or boolean 4D attention mask; flash_attention_2 takes only 2D padding",
    "auto": r"attn='auto' has no mode for flash_attention_2 under gradient checkpointing .* attn_implementation='sdpa'",
}


def expected_way(implementation: str, attn: str, checkpointing: bool) -> str:
    return WAYS[attn, checkpointing][implementation == "flash_attention_2"]


def reference_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None, causal=False
):
    """flash_attn_varlen_func's contract in plain torch: q [total_q, heads, d] and k, v [total_k, kv_heads, d] packed
    by cu_seqlens; a causal query attends to the keys up to its own position counted from the end (bottom-right)."""
    out = []
    for b in range(len(cu_seqlens_q) - 1):
        qb = q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]].transpose(0, 1)
        kb, vb = (x[cu_seqlens_k[b] : cu_seqlens_k[b + 1]].transpose(0, 1) for x in (k, v))
        kb, vb = (x.repeat_interleave(qb.shape[0] // x.shape[0], dim=0) for x in (kb, vb))
        scores = qb @ kb.transpose(-1, -2) * (softmax_scale or qb.shape[-1] ** -0.5)
        if causal:
            q_len, k_len = qb.shape[1], kb.shape[1]
            seen = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
            scores = scores.masked_fill(~seen, float("-inf"))
        out.append((scores.softmax(-1) @ vb).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture
def cpu_kernels(monkeypatch):
    """flash_attention_2 and flex_attention as transformers dispatches them, on reference kernels that run here;
    yields the names of the implementations whose kernel was called."""
    called = set()
    kernels = (None, reference_varlen, None, hf_flash._pad_input, hf_flash._unpad_input)
    process = (hf_flash._lazy_define_process_function(reference_varlen), dict)

    def flash_kernels(*args, **kwargs):
        called.add("flash_attention_2")
        return kernels, process

    def flex_kernel(q, k, v, training=False, **kwargs):
        called.add("flex_attention")
        return torch_flex.flex_attention(q, k, v, **kwargs)

    build_block_mask = hf_masks.create_block_mask
    monkeypatch.setattr(hf_flash, "lazy_import_flash_attention", flash_kernels)
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", flex_kernel)
    monkeypatch.setattr(
        hf_masks, "create_block_mask", lambda *args, _compile=False, **kw: build_block_mask(*args, _compile=False, **kw)
    )
    return called


def llama_with(implementation: str, checkpointing: bool):
    model = tiny_model("llama").train()
    model.config._attn_implementation = implementation
    if checkpointing:
        enable_activation_checkpointing(model)
    return model


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attn", ["cache", "tree", "auto"])
@pytest.mark.parametrize("implementation", ATTN_IMPLEMENTATIONS)
def test_every_cell_is_exact_or_refused_before_any_forward(cpu_kernels, implementation, attn, checkpointing):
    batch = random_batch(2, 3, seed=len(implementation) + len(attn))
    reference = tiny_model("llama")  # same weights, sdpa, no checkpointing
    model = llama_with(implementation, checkpointing)
    forwards = []
    model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    way = expected_way(implementation, attn, checkpointing)
    if way == REFUSED:
        with pytest.raises(ValueError, match=REFUSALS[attn]):
            sk.pair_logprobs(model, batch, attn=attn)
        assert forwards == []
        return
    assert resolve_attn(model, attn) == way
    M_ref = naive_matrix(reference, batch)
    with torch.set_grad_enabled(implementation != "flex_attention"):  # no flex backward on the CPU: forward only
        M = sk.pair_logprobs(model, batch, attn=attn)
    assert cpu_kernels == {implementation} & {"flash_attention_2", "flex_attention"}
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    if implementation == "flex_attention":
        return
    upstream = torch.randn(M.shape)
    for g, g_ref in zip(grads(model, M, upstream), grads(reference, M_ref, upstream), strict=True):
        assert (g - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item() + 1e-7


def test_without_prefix_sharing_every_implementation_runs_but_bad_names_are_refused():
    model = llama_with("flash_attention_2", checkpointing=True)
    assert resolve_attn(model, "auto", prefix_sharing=False) == "full"
    with pytest.raises(ValueError, match="attn must be 'auto', 'cache' or 'tree', got 'flash'"):
        resolve_attn(model, "flash", prefix_sharing=False)


@pytest.mark.parametrize("attn", ["cache", "tree", "auto"])
def test_an_unknown_attention_implementation_is_refused(attn):
    model = llama_with("flash_attention_3", checkpointing=False)
    with pytest.raises(ValueError, match="the model uses 'flash_attention_3': load it with attn_implementation='sdpa'"):
        sk.pair_logprobs(model, random_batch(1, 2), attn=attn)
    if attn != "tree":  # gradient caching runs the cache path
        with pytest.raises(ValueError, match="the model uses 'flash_attention_3'"):
            sk.sami_step_loss(model, random_batch(1, 2), attn=attn, max_pairs_per_pass=2)
