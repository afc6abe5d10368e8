"""Scale-out training (recipes/training.py): weights in bfloat16 with fp32 master weights, gradient checkpointing,
FSDP2 and DDP under torchrun (gloo, CPU) equal to one process for the SAMI loop and SELF-ALIGN's SFT, a sharded
checkpoint resumed after SIGKILL, the process group's timeout, and checkpoint hashing."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_sami_loop import ROOT, tiny_config, weights

from sami_kernels.engine.models import tiny_random_path
from sami_kernels.engine.packed import tokenize_pair
from sami_kernels.engine.pairs import PairBatch, PairScorer
from sami_kernels.recipes import checkpoint, training
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.self_align.sft import SFTConfig, sft_train

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(command, tmp_path, config: dict, name: str) -> subprocess.Popen:
    """command + [config file] in a new session (so SIGKILL reaches torchrun's workers too)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [*command, str(path)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(*processes) -> None:
    for p in processes:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output[-4000:]


SAMI = ("-m", "sami_kernels", "sami", "--config")


def movement(trained: dict) -> float:
    """How far training moved saved weights: from the base model's, or for a LoRA adapter its B matrices from 0."""
    if any("lora_B" in k for k in trained):
        return max(trained[k].abs().max().item() for k in trained if "lora_B" in k)
    base = load_file(tiny_random_path() / "model.safetensors")
    return max((trained[k] - base[k]).abs().max().item() for k in trained)


def assert_weights_close(a: dict, b: dict, *, moved: float, atol: float) -> None:
    assert a.keys() == b.keys()
    assert movement(a) > moved  # training moved the weights well beyond the tolerance
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


# ---- SAMI loop: FSDP2 with 2 processes == 1 process ----------------------------------------------------------------
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0}], ids=["full", "lora"])
def test_sami_fsdp_two_processes_equal_one(tmp_path, lora):
    """2 processes x 2 queries (micro-batches of 1) under fsdp == 1 process x 4 queries. Tolerance 1e-6 as in
    test_sami_loop's DDP test: the processes' gradients are summed in another order (float rounding ~1e-9 per
    element), and AdamW with eps = 1e-6 turns such noise into at most a fraction of lr = 1e-5 per step; a dropped or
    mis-weighted micro-batch or process moves weights by ~lr, far above it."""
    training_keys = {"steps": [3], "optimizer": {"lr": 1e-5, "eps": 1e-6}, "lora": lora}
    if lora:  # B starts at 0: a larger lr for a visible move; eps keeps noise-level elements below the tolerance
        training_keys["optimizer"] = {"lr": 1e-4, "eps": 1e-5}
    one = tiny_config(tmp_path / "one", training={**training_keys, "micro_batch_queries": 4})
    two = tiny_config(tmp_path / "two", training={**training_keys, "micro_batch_queries": 1, "distributed": "fsdp"})
    finish(launch((sys.executable, *SAMI), tmp_path, one, "one"), launch((*TORCHRUN, *SAMI), tmp_path, two, "two"))
    assert_weights_close(weights(tmp_path / "one"), weights(tmp_path / "two"), moved=2e-5, atol=1e-6)
    metrics = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert m1["kind"] == m2["kind"] and m1["step"] == m2["step"]
        assert abs(m1.get("loss", 0) - m2.get("loss", 0)) < 1e-6 and abs(m1["mi"] - m2["mi"]) < 1e-6
        if m1["kind"] == "train":  # AdamW hides a gradient's scale; its norm does not
            assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    manifest = json.loads((tmp_path / "two" / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    assert manifest["layout"] == "sharded" and "shards/.metadata" in manifest["files"]


def test_sami_fsdp_sigkill_then_rerun_ends_with_the_uninterrupted_weights(tmp_path):
    training_keys = {"steps": [10], "micro_batch_queries": 1, "distributed": "fsdp", "checkpoint_every": 1}
    killed = tiny_config(tmp_path / "killed", training=training_keys)
    whole = tiny_config(tmp_path / "whole", training=training_keys)
    process = launch((*TORCHRUN, *SAMI), tmp_path, killed, "killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text().strip() >= "step-00000003") and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "iter-0" / "model").exists()
    finish(launch((*TORCHRUN, *SAMI), tmp_path, killed, "killed"), launch((*TORCHRUN, *SAMI), tmp_path, whole, "whole"))
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same reductions: bitwise
    losses = lambda out: [  # noqa: E731
        m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"
    ]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 10


# ---- SELF-ALIGN SFT: 2 processes == 1 process ------------------------------------------------------------------------
SFT_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoTokenizer
from sami_kernels.engine.models import tiny_random_path
from sami_kernels.engine.packed import tokenize_pair
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.self_align.sft import SFTConfig, sft_train
spec = json.loads(Path(sys.argv[1]).read_text())
tokenizer = AutoTokenizer.from_pretrained(tiny_random_path())
sequences = [tokenize_pair(tokenizer, p, r, cutoff=spec["config"]["cutoff"]) for p, r in spec["pairs"]]
config = from_mapping(SFTConfig, spec["config"])
sft_train(Path(spec["out"]), str(tiny_random_path()), sequences, config, tokenizer, seed=3, show=False, desc="sft")
if torch.distributed.is_initialized():  # sft_train leaves the group to its caller
    torch.distributed.destroy_process_group()
"""


def sft_pairs(count: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(5)
    words = "tea river lamp quiet orbit maple salt window copper drift".split()
    pick = lambda n: " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())  # noqa: E731
    return [(f"Q{k}: {pick(2 + k % 7)}\n", pick(3 + (k * 5) % 11)) for k in range(count)]


@pytest.mark.parametrize(("mode", "lora"), [("ddp", {"r": 4, "alpha": 8, "dropout": 0.0}), ("fsdp", None)])
def test_sft_two_processes_equal_one(tmp_path, mode, lora):
    """9 sequences, 4 per step: steps of 4, 4 and 1 sequences, so in the last step one process has no sequence and
    joins with a weight-0 row; rows of at most 48 tokens, so the processes run different numbers of rows. Tolerance
    1e-6: gradient sums in another order (see the SAMI test), lr 1e-4, eps 1e-5."""
    from transformers import AutoTokenizer

    sft = {
        "epochs": 1,
        "batch_sequences": 4,
        "pack_tokens": 48,
        "cutoff": 40,
        "checkpoint_every": 1,
        "optimizer": {"lr": 1e-4, "eps": 1e-5, "warmup_steps": 0},
        "lora": lora,
        "distributed": mode,
    }
    pairs = sft_pairs(9)
    script = tmp_path / "sft.py"
    script.write_text(SFT_SCRIPT)
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({"pairs": pairs, "config": sft, "out": str(tmp_path / "two")}))
    process = subprocess.Popen(
        [*TORCHRUN, str(script), str(spec)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path())
    sequences = [tokenize_pair(tokenizer, p, r, cutoff=sft["cutoff"]) for p, r in pairs]
    config = from_mapping(SFTConfig, sft)
    sft_train(tmp_path / "one", str(tiny_random_path()), sequences, config, tokenizer, seed=3, show=False, desc="sft")
    finish(process)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(tmp_path / run / "model" / name) for run in ("one", "two"))
    assert_weights_close(a, b, moved=1e-4, atol=1e-6)
    metrics = lambda out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for m1, m2 in zip(one, two, strict=True):  # AdamW hides a gradient's scale; its norm does not
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


# ---- weights in bfloat16, master weights, gradient checkpointing -------------------------------------------------
def test_bfloat16_weights_load_in_bfloat16_with_a_float32_lora():
    lora = training.LoRAConfig(r=2, alpha=4, dropout=0.0)
    model = training.load_model(tiny_random_path(), device="cpu", lora=lora, dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


@pytest.mark.parametrize("master_weights", [True, False])
def test_master_weights_keep_updates_below_bfloat16_resolution(master_weights):
    """Weights in [0.5, 1): a bfloat16 step there is 2^-8, and AdamW moves each weight by about lr = 4e-4 per step
    (a gradient of constant sign), under half a step: rounded away every time without master weights, accumulated
    in the fp32 copy (and so, after a few steps, in the bfloat16 weights) with them."""
    layer = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.0)
    layer.to(torch.bfloat16)
    start = layer.weight.detach().clone()
    trainable = training.Trainable(layer, master_weights=master_weights)
    optimizer = training.build_optimizer(trainable.parameters(), training.OptimizerConfig(lr=4e-4))
    scheduler = training.build_scheduler(optimizer, training.OptimizerConfig(lr=4e-4), 20)
    x, target = torch.randn(16, 8).to(torch.bfloat16), torch.randn(16, 4).to(torch.bfloat16)
    for _ in range(20):
        (layer(x) * target).sum().backward()
        training.apply_update(trainable, optimizer, scheduler, max_grad_norm=0.0)
    (stepped,) = trainable.parameters()
    if master_weights:
        assert stepped.dtype == torch.float32 and optimizer.state[stepped]["exp_avg"].dtype == torch.float32
        assert (stepped - start.float()).abs().min() > 10 * 4e-4 * 0.5  # every fp32 copy moved
        assert torch.equal(layer.weight, stepped.to(torch.bfloat16))  # the model holds the copies, rounded
        assert (layer.weight != start).float().mean() > 0.9
    else:
        assert stepped is layer.weight and torch.equal(layer.weight, start)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The pair engine with activation checkpointing (attn auto: the tree path) and without (the cache path): the
    same parameter gradients, fp32, up to summation order."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_path())
    batch = PairBatch.from_texts(
        tokenizer,
        ["How do I keep basil fresh?", "Why is the sky blue?"],
        ["Be helpful.", "Be unhelpful."],
        [[" Put it in water.", " Basil."], [" Scattering of light.", " It is."]],
    )
    upstream = torch.randn(2, 2, 2)
    grads = []
    for checkpointing in (False, True):
        model = training.load_model(tiny_random_path(), device="cpu", lora=None, gradient_checkpointing=checkpointing)
        model.train()
        (PairScorer(model)(batch) * upstream).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


# ---- the process group's timeout; checkpoint hashing --------------------------------------------------------------
def test_process_group_gets_the_timeout(monkeypatch):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(training.dist, "init_process_group", lambda backend, **kwargs: joined.update(kwargs))
    training.Processes(timeout_minutes=7)
    assert joined == {"timeout": timedelta(minutes=7)}
    with pytest.raises(ValueError, match="timeout_minutes must be >= 1"):
        training.Processes(timeout_minutes=0)


@pytest.mark.parametrize("hashing", ["all", "small", "none"])
def test_checkpoint_hashing_policy(tmp_path, monkeypatch, hashing):
    """hashing "small": SHA-256 of files up to SMALL_FILE_BYTES (here 3000 bytes: state.pt), sizes of bigger ones."""
    monkeypatch.setattr(checkpoint, "SMALL_FILE_BYTES", 3000)
    directory = checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.randn(1000)}, {"step": 1}, hashing=hashing)
    files = json.loads((directory / checkpoint.MANIFEST_FILE).read_text())["files"]
    hashed = {name for name, entry in files.items() if "sha256" in entry}
    assert hashed == {"all": {"weights.safetensors", "state.pt"}, "small": {"state.pt"}, "none": set()}[hashing]
    weights_file = directory / checkpoint.WEIGHTS_FILE
    data = bytearray(weights_file.read_bytes())
    data[-3] ^= 0xFF  # same size, other content: caught only where hashed
    weights_file.write_bytes(bytes(data))
    if hashing == "all":
        with pytest.raises(checkpoint.CheckpointError, match="weights.safetensors sha256 mismatch"):
            checkpoint.load_latest(tmp_path)
    else:
        assert checkpoint.load_latest(tmp_path)[0] == 1
    with pytest.raises(ValueError, match="hashing must be one of"):
        checkpoint.save_checkpoint(tmp_path, 2, {}, {}, hashing="some")


def test_timeout_minutes_is_checked_by_the_config():
    from sami_kernels.recipes.sami.config import SAMIConfig

    config = from_mapping(SAMIConfig, {"training": {"timeout_minutes": 0}})
    with pytest.raises(ValueError, match=r"training.timeout_minutes must be >= 1"):
        config.validate()


# ---- SELF-ALIGN, every stage under torchrun == one process --------------------------------------------------------
SELF_ALIGN_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_self_align import WellFormed, tiny_config
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.self_align.config import SelfAlignConfig
from sami_kernels.recipes.self_align.loop import run_self_align
config = tiny_config(sys.argv[1])
for sft in (config["engraving"], config["verbose"]["training"]):
    sft.update(distributed="fsdp", lora={{"dropout": 0.0}})  # dropout draws differ between 1 and 2 processes
run_self_align(from_mapping(SelfAlignConfig, config), make_generator=WellFormed)
"""


def test_self_align_all_stages_two_processes_equal_one(tmp_path):
    """Generation stages run on the main process while the other waits (their files written once, byte-equal to a
    one-process run's); stage 3's SFT is sharded (adapter equal to one process's up to float sums in another order).
    Stage 4 samples from that adapter, and the random model's sampled tokens follow its last bits, so stage 4 and
    eval are checked for completing, not for equality."""
    script = tmp_path / "self_align.py"
    script.write_text(SELF_ALIGN_SCRIPT.format(tests=str(ROOT / "tests")))
    for name, command in {"one": (sys.executable,), "two": TORCHRUN}.items():
        done = subprocess.run(
            [*command, str(script), str(tmp_path / name)], cwd=ROOT, env=ENV, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    for file in ("stage1.jsonl", "stage2.jsonl", "stage2.log.jsonl"):
        assert (one / file).read_bytes() == (two / file).read_bytes(), file
    a, b = (load_file(d / "stage3" / "model" / "adapter_model.safetensors") for d in (one, two))
    assert_weights_close(a, b, moved=1e-3, atol=1e-6)
    assert movement(load_file(two / "stage4" / "model" / "adapter_model.safetensors")) > 1e-3
    assert set(json.loads((two / "eval.json").read_text())) == {"base", "stage3", "stage4", "items"}
