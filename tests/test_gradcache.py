"""Gradient caching over pair chunks (engine/gradcache.py): sami_step_loss(..., max_pairs_per_pass=k) gives the loss,
M and every parameter gradient of the one-graph computation (fp32, 1e-5) on tiny Llama / Mistral / Qwen2 / GPT-2,
with chunk sizes that do not divide B N or B N^2 (several prompt groups and chunks), with LoRA, under gradient
checkpointing and with dropout; the SAMI loop with training.max_pairs_per_pass under DDP and FSDP2 (2 gloo processes)
equals one process."""

import json
import sys

import pytest
import torch
from test_distributed import SAMI, TORCHRUN, assert_weights_close, finish, launch
from test_pairs import naive_matrix, random_batch, tiny_model
from test_sami_loop import tiny_config, weights

import sami_kernels as sk
from sami_kernels.engine import gradcache
from sami_kernels.engine.groups import _response_states, _scored_tokens
from sami_kernels.engine.head import decoder_and_head, head_sequence_logprobs
from sami_kernels.engine.pairs import _pair_rows
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.sami.config import SAMIConfig


def trainable_grads(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(grads, reference) -> None:
    assert len(grads) == len(reference) > 0
    for g, g_ref in zip(grads, reference, strict=True):
        assert (g - g_ref).abs().max().item() <= 1e-5 * g_ref.abs().max().item() + 1e-7


def chunked_step(model, batch, k, *, direction, loss_scale):
    """(loss, M, gradients) by sami_step_loss with max_pairs_per_pass=k."""
    loss, M = sk.sami_step_loss(model, batch, direction=direction, max_pairs_per_pass=k, loss_scale=loss_scale)
    assert not loss.requires_grad and not M.requires_grad
    return loss, M, trainable_grads(model)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("k", [2, 4, 5, 100])
def test_loss_matrix_and_every_gradient_equal_naive(arch, k):
    """B = 2, N = 3: 6 prompt rows in groups of k, their 18 pairs in chunks of k within each group (k = 4: groups of 4
    and 2 rows, chunks 4 4 4 | 4 2; k = 5: groups of 5 and 1, chunks 5 5 5 | 3), or one group and chunk; random
    texts give a non-uniform dL/dM; loss_scale scales the gradients only."""
    model = tiny_model(arch)
    batch = random_batch(2, 3, seed=k)
    direction = {2: "both", 4: "row", 5: "col", 100: "both"}[k]
    loss, M, grads = chunked_step(model, batch, k, direction=direction, loss_scale=0.37)
    M_ref = naive_matrix(model, batch)
    loss_ref = sk.infonce_loss(M_ref, direction=direction)
    (0.37 * loss_ref).backward()
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(grads, trainable_grads(model))


def lora_model(dropout: float):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    return peft.get_peft_model(tiny_model("llama"), config)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_under_gradient_checkpointing_equals_naive():
    """LoRA, train mode, activation checkpointing: transformers would drop the caches; the chunked step switches the
    layers' checkpointing off for its passes (and back on) and is exact."""
    model = lora_model(dropout=0.0)
    batch = random_batch(2, 3, seed=5)
    M_ref = naive_matrix(model, batch)
    sk.infonce_loss(M_ref).backward()
    reference = trainable_grads(model)
    assert len(reference) == 2 * 4 * 2  # A and B of 4 projections in 2 layers
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    flags = lambda: [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]  # noqa: E731
    before = flags()
    assert any(before)
    _, M, grads = chunked_step(model, batch, 4, direction="both", loss_scale=1.0)
    assert flags() == before
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, reference)


def one_graph_reference(model, batch, k, *, direction, loss_scale):
    """The chunked forward in one autograd graph, its random draws in cached_step's order (the prefix passes of the
    groups of k prompt rows, then the chunks of k pair rows within each group): (loss, M, gradients of
    loss_scale * loss by one backward)."""
    decoder, head, temperature = decoder_and_head(model)
    prompts, pairs, owner = _pair_rows(batch, "cpu")
    N = batch.num_constitutions
    groups = [range(s, min(s + k, len(prompts))) for s in range(0, len(prompts), k)]
    prefixes = [gradcache._Prefix.run(decoder, [prompts[r] for r in rows], "cpu") for rows in groups]
    values = []
    for rows, prefix in zip(groups, prefixes, strict=True):
        for s in range(N * rows.start, N * rows.stop, k):
            chunk = slice(s, min(s + k, N * rows.stop))
            states, targets = _response_states(decoder, *prefix.rows(owner[chunk] - rows.start), pairs[chunk], "cpu")
            hidden, targets, seq_ids, _ = _scored_tokens(states, targets, pairs[chunk])
            values.append(
                head_sequence_logprobs(head, temperature, hidden, targets, seq_ids, len(pairs[chunk]), reduction="mean")
            )
    M = torch.cat(values).view(batch.num_queries, N, N)
    loss = sk.infonce_loss(M, direction=direction)
    (loss_scale * loss).backward()
    return loss.detach(), M.detach(), trainable_grads(model)


def with_dropout(model, p: float):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model.train()


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
@pytest.mark.parametrize("arch", ["gpt2", "llama-lora"])
def test_dropout_masks_are_the_same_in_both_passes_of_a_chunk(arch):
    """Train mode, dropout 0.2 (GPT-2's embedding, attention and residual dropouts; LoRA's dropout): the chunked step
    equals the one-graph computation that draws the same masks; with other masks in a chunk's second pass the
    gradients would belong to another M."""
    model = with_dropout(tiny_model("gpt2") if arch == "gpt2" else lora_model(dropout=0.2), 0.2)
    batch = random_batch(2, 3, seed=9)
    torch.manual_seed(1)
    loss, M, grads = chunked_step(model, batch, 5, direction="both", loss_scale=0.5)
    after = torch.rand(3)
    torch.manual_seed(1)
    loss_ref, M_ref, reference = one_graph_reference(model, batch, 5, direction="both", loss_scale=0.5)
    assert torch.equal(after, torch.rand(3))  # the RNG advanced as by one forward
    torch.testing.assert_close(M, M_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(M, naive_matrix(model.eval(), batch), atol=1e-3)  # dropout did change M
    assert_grads_close(grads, reference)


def test_bad_arguments_are_refused():
    model, batch = tiny_model("llama"), random_batch(1, 2)
    for k in (0, 2.0, True):
        with pytest.raises(ValueError, match="max_pairs_per_pass must be an int >= 1"):
            sk.sami_step_loss(model, batch, max_pairs_per_pass=k)
    with pytest.raises(ValueError, match="attn must be 'auto' or 'cache', got 'tree'"):
        sk.sami_step_loss(model, batch, max_pairs_per_pass=2, attn="tree")
    with pytest.raises(ValueError, match="prefix_sharing=True"):
        sk.sami_step_loss(model, batch, max_pairs_per_pass=2, prefix_sharing=False)
    with pytest.raises(ValueError, match="loss_scale is used with max_pairs_per_pass only"):
        sk.sami_step_loss(model, batch, loss_scale=0.5)


def test_config_key_is_checked():
    with pytest.raises(ValueError, match="training.max_pairs_per_pass must be >= 1"):
        from_mapping(SAMIConfig, {"training": {"max_pairs_per_pass": 0}}).validate()


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_sami_two_processes_with_chunks_equal_one(tmp_path, distributed):
    """2 processes x 2 queries (micro-batches of 2, N = 2: prompt groups of 3 and 1 rows, pairs in chunks of 3, 3, 2)
    under DDP or FSDP2 == 1 process x 4 queries in one pass: no micro-batch, group, chunk or process dropped or
    synchronised twice. Tolerances as in test_distributed's SAMI tests."""
    training = {"steps": [3], "optimizer": {"lr": 1e-5, "eps": 1e-6}}
    one = tiny_config(tmp_path / "one", training={**training, "micro_batch_queries": 4})
    two = tiny_config(
        tmp_path / "two",
        training={**training, "micro_batch_queries": 2, "max_pairs_per_pass": 3, "distributed": distributed},
    )
    finish(launch((sys.executable, *SAMI), tmp_path, one, "one"), launch((*TORCHRUN, *SAMI), tmp_path, two, "two"))
    assert_weights_close(weights(tmp_path / "one"), weights(tmp_path / "two"), moved=2e-5, atol=1e-6)
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert m1["kind"] == m2["kind"] and m1["step"] == m2["step"]
        assert abs(m1.get("loss", 0) - m2.get("loss", 0)) < 1e-6 and abs(m1["mi"] - m2["mi"]) < 1e-6
        if m1["kind"] == "train":
            assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
