"""`sami-kernels plan` (recipes/plan.py): exact parameter counts from the meta device, the state bytes of DDP and
FSDP2 per rank, and the activation formula against the bytes autograd really saves for one pair-engine forward."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

from sami_kernels.cli import main
from sami_kernels.engine.pairs import PairBatch, pair_logprobs
from sami_kernels.recipes import plan
from sami_kernels.recipes.training import LoRAConfig

EXAMPLES = Path(__file__).parents[1] / "examples"
LLAMA_7B = str(EXAMPLES / "models" / "llama-2-7b")


def test_meta_counts_equal_the_real_tiny_model():
    from transformers import AutoModelForCausalLM

    from sami_kernels.engine.models import tiny_random_path

    real = AutoModelForCausalLM.from_pretrained(tiny_random_path())
    shape = plan.model_shape("tiny-random", None)
    assert shape.model == plan.Counts(base=sum(p.numel() for p in real.parameters()))
    assert shape.layers == real.config.num_hidden_layers
    assert shape.layer.total == sum(p.numel() for p in real.model.layers[0].parameters())
    assert shape.root.total == shape.model.total - shape.layers * shape.layer.total


def test_meta_counts_of_llama_2_7b_are_the_published_ones():
    shape = plan.model_shape(LLAMA_7B, None)
    h, i, v = 4096, 11008, 32000
    layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two norms
    assert shape.layer.total == layer
    assert shape.model.total == 32 * layer + 2 * v * h + h == 6_738_415_616  # "6.74B"
    lora = plan.model_shape(LLAMA_7B, LoRAConfig(r=16))  # q, k, v, o: A [16, h] and B [h, 16] each
    assert lora.model.adapter == 32 * 4 * 2 * 16 * h
    assert lora.model.frozen == shape.model.total and lora.model.base == 0
    assert lora.adapted_inputs == (h, h, h, h)


@pytest.fixture(scope="module")
def llama_7b():
    return plan.model_shape(LLAMA_7B, None)


def test_fsdp_shards_states_over_the_world_plus_the_gathered_units(llama_7b):
    total, root, layer = llama_7b.model.total, llama_7b.root.total, llama_7b.layer.total
    ch = plan.Choices(master_weights=False)
    for world in (1, 3, 8):
        weights, grads, master, optimizer = plan.plan_states(llama_7b, ch, "fsdp", 2, world)
        assert weights == math.ceil(2 * total / world) + 2 * root + 2 * 2 * layer  # + the root, 2 layers gathered
        assert grads == math.ceil(2 * total / world) + 2 * root + 2 * layer
        assert master == 0 and optimizer == math.ceil(2 * 2 * total / world)  # AdamW states in bf16
    ddp = plan.plan_states(llama_7b, ch, "ddp", 2, 8)
    assert ddp == (2 * total, 2 * total, 0, 4 * total)  # replicated; the gradients are DDP's bucket views


def test_bfloat16_halves_the_weights_and_master_weights_cost_8_bytes(llama_7b):
    total = llama_7b.model.total
    fp32 = plan.plan_states(llama_7b, plan.Choices(), "ddp", 4, 8)
    bf16 = plan.plan_states(llama_7b, plan.Choices(master_weights=True), "ddp", 2, 8)
    assert 2 * bf16[0] == fp32[0] == 4 * total
    assert bf16[2] == 8 * total and bf16[3] == fp32[3] == 8 * total  # fp32 copy + its grad; AdamW fp32 states
    assert sum(bf16) == 20 * total  # training.py's 2 + 2 + 4 + 4 + 8 bytes per parameter


def test_lora_adapters_stay_float32_and_only_they_have_grads():
    shape = plan.model_shape(LLAMA_7B, LoRAConfig(r=16))
    a, frozen = shape.model.adapter, shape.model.frozen
    weights, grads, master, optimizer = plan.plan_states(shape, plan.Choices(), "ddp", 2, 1)
    assert (weights, grads, master, optimizer) == (2 * frozen + 4 * a, 4 * a, 0, 8 * a)


def test_checkpointing_lowers_activations_and_takes_the_tree_path(llama_7b):
    rows = plan.plans(llama_7b, plan.Choices(attn="auto"), 8, lambda path: plan.pair_workload(1, 2, 512, 350, path))
    by_key = {(p.distributed, p.model_dtype, p.checkpointing): p for p, _ in rows}
    for dist in ("ddp", "fsdp"):
        for dtype in ("float32", "bfloat16"):
            off, on = by_key[dist, dtype, False], by_key[dist, dtype, True]
            assert (off.path, on.path) == ("cache", "tree")
            assert on.activations < off.activations / 4
    assert by_key["ddp", "bfloat16", False].activations < by_key["ddp", "float32", False].activations
    refused = plan.plans(llama_7b, plan.Choices(attn="cache"), 8, lambda path: plan.pair_workload(1, 2, 8, 8, path))
    assert [p.path for p, _ in refused if p.checkpointing] == ["refused"] * 4


def _saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one pair-engine forward, each storage once, parameters
    apart (they are the weights' bytes, not activations)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        pair_logprobs(model, batch, attn="cache")
    return sum(saved.values())


@pytest.mark.parametrize(
    "dtype, lora", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, LoRAConfig(r=8, dropout=0.0))]
)
def test_activation_formula_matches_the_bytes_autograd_saves(dtype, lora):
    """A Llama large enough that per-token terms dominate (hidden 256, 4 layers, GQA 8 / 4 heads), random init and
    random tokens, prompts and responses of uneven lengths (so both passes get a padding mask, as in training).
    The formula counts the padded widths P and R exactly as the engine pads them; what it does not count is the
    head's padding (it counts B N^2 R scored tokens, the batch scores fewer) and the engine's 1-byte gather mask:
    well under 1% here, where the layers' own terms are exact (see the module docstring)."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(dtype)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        adapter = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM")
        model = get_peft_model(model, adapter)
    model.train()
    B, N, P, R = 2, 3, 60, 40
    lengths = lambda top, n: (top - torch.randint(0, 6, (n,))).tolist()  # noqa: E731
    ids = lambda n: torch.randint(3, 512, (n,)).tolist()  # noqa: E731
    prompts = [[ids(n) for n in lengths(P, N)] for _ in range(B)]
    responses = [[ids(n) for n in lengths(R, N)] for _ in range(B)]
    P, R = max(len(p) for q in prompts for p in q), max(len(r) for q in responses for r in q)
    batch = PairBatch(prompts, responses, [[r] * N for r in responses])

    measured = _saved_bytes(model, batch)
    shape = plan.shape_of(model, "test", lora)
    formula = plan.activation_bytes(shape, plan.pair_workload(B, N, P, R, "cache"), dtype.itemsize, False)
    assert measured <= formula <= 1.01 * measured, (measured, formula)


def _write(tmp_path, name, config) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_cli_prints_every_combination_and_marks_the_configs_choice(tmp_path, capsys):
    config = {
        "model": "tiny-random",
        "model_dtype": "bfloat16",
        "generation": {"max_new_tokens": 24},
        "training": {"distributed": "fsdp", "gradient_checkpointing": True, "micro_batch_queries": 3},
    }
    main(["plan", "--config", _write(tmp_path, "sami.yaml", config), "--world-size", "4", "--gpu-memory-gb", "16"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[2:].startswith(("ddp", "fsdp"))]
    assert len(lines) == 8
    assert [line.split()[1:4] for line in lines if line.startswith("*")] == [["fsdp", "bfloat16", "on"]]
    assert "B=3 queries x N=2 constitutions, prompts P=512, responses R=24" in out
    assert "response tokens B N^2 R = 288" in out  # 3 x 2^2 x 24


def test_cli_plans_both_sft_stages_of_a_self_align_config(tmp_path, capsys):
    config = {"model": "tiny-random", "engraving": {"pack_tokens": 256}, "verbose": {"training": {"lora": None}}}
    main(["plan", "--config", _write(tmp_path, "align.yaml", config), "--world-size", "2"])
    out = capsys.readouterr().out
    assert "SELF-ALIGN SFT (engraving): packed rows of 256 tokens" in out
    assert "SELF-ALIGN SFT (verbose): packed rows of 2048 tokens" in out
    assert "(LoRA r=16)" in out and "(full fine-tune)" in out


def test_bad_options_are_refused_by_name(tmp_path):
    path = _write(tmp_path, "sami.yaml", {"model": "tiny-random"})
    with pytest.raises(SystemExit, match="--world-size"):
        main(["plan", "--config", path, "--world-size", "0"])
    with pytest.raises(SystemExit, match="--prompt-tokens"):
        main(["plan", "--config", path, "--prompt-tokens", "-1"])


def test_the_7b_example_config_plans_mistral_7b_and_fits_80_gib_as_configured():
    mistral = EXAMPLES / "models" / "mistral-7b-v0.1"
    config = EXAMPLES / "configs" / "sami_7b_8gpu.yaml"
    text = plan.run_plan(config, [f"model={mistral}"], world_size=8, gpu_memory_gb=80)
    assert "7,241,732,096 parameters" in text  # Mistral-7B's published 7.24B
    chosen = [line for line in text.splitlines() if line.startswith("*")]
    assert len(chosen) == 1 and chosen[0].split()[1:4] == ["fsdp", "bfloat16", "off"]
    assert chosen[0].endswith("yes")
