"""The SAMI loop end to end on the tiny random model: outputs, options, SIGKILL + resume (bitwise on CPU fp32), a
corrupt checkpoint refused, torchrun with 2 processes equal to 1 process, and SAMITrainer in transformers.Trainer."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sami_kernels.engine.models import tiny_random_path
from sami_kernels.recipes.checkpoint import CheckpointError
from sami_kernels.recipes.config import from_mapping
from sami_kernels.recipes.sami.config import TEMPLATES, SAMIConfig
from sami_kernels.recipes.sami.loop import run_sami

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **sections) -> dict:
    config = {
        "model": "tiny-random",
        "output_dir": str(out),
        "progress": False,
        "generation": {"max_new_tokens": 6, "batch_size": 5, "filters": False},  # a random model repeats itself
        "data": {"heldout_queries": 3, "train_queries": 10},
        "training": {
            "iterations": 1,
            "steps": [3],
            "batch_queries": 4,
            "micro_batch_queries": 2,
            "optimizer": {"lr": 3e-3},
        },
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


def run(config: dict) -> dict:
    return run_sami(from_mapping(SAMIConfig, config))


def weights(out, iteration=0) -> dict:
    directory = Path(out) / f"iter-{iteration}" / "model"
    name = "adapter_model.safetensors" if (directory / "adapter_config.json").exists() else "model.safetensors"
    return load_file(directory / name)


def cli(config: dict, tmp_path, *launcher, name="config.yaml") -> subprocess.Popen:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    command = [*launcher] if launcher else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, "-m", "sami_kernels", "sami", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_iterations_write_every_output(tmp_path):
    summary = run(tiny_config(tmp_path, training={"iterations": 2, "steps": [2, 3]}, evaluation={"judge_queries": 2}))
    for name in ("config.yaml", "heldout.jsonl", "metrics.jsonl", "sami.png", "judge.jsonl", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for t in (0, 1):
        records = [json.loads(line) for line in (tmp_path / f"iter-{t}" / "generations.jsonl").read_text().splitlines()]
        assert records and all(len(r["responses"]) == 2 and len(r["constitutions"]) == 2 for r in records)
        assert (tmp_path / f"iter-{t}" / "model" / "model.safetensors").exists()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4, 5] and [m["iteration"] for m in train] == [0, 0, 1, 1, 1]
    for m in train:
        assert abs(m["mi"] - (0.6931471805599453 - m["loss"])) < 1e-12
        assert 0 <= m["diagonal_accuracy"] <= 1 and m["tokens_per_s"] > 0 and m["grad_norm"] > 0
    heldout = [m for m in metrics if m["kind"] == "heldout"]
    assert [m["step"] for m in heldout] == [0, 1, 2, 3, 4, 5]
    assert summary["heldout_mi_before"] == heldout[0]["mi"] and summary["heldout_mi_after"] == heldout[-1]["mi"]
    assert 0 <= summary["judge_win_rate"] <= 1
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (tmp_path / "sami.png").read_bytes()[:4] == b"\x89PNG"


def test_summarisation_preset(tmp_path):
    """The preset's set, data and filters end to end. The random model's tokens mostly glue onto the prefill's last
    word ("The post" + "ist..."), which drops the query (test_sami_fidelity), so the templates here end in a colon."""
    template = TEMPLATES["summarisation"][1].removesuffix(" The post")
    run(
        tiny_config(
            tmp_path,
            constitutions={"set": "summarisation"},
            data={"source": "builtin:summarisation", "heldout_queries": 2, "train_queries": 4},
            generation={"template": template},
            training={"template": template},
        )
    )
    records = [json.loads(line) for line in (tmp_path / "iter-0" / "generations.jsonl").read_text().splitlines()]
    assert {name for r in records for c in r["constitutions"] for name, _ in c} == {"concise", "comprehensive"}
    assert len(records) == 4 and (tmp_path / "iter-0" / "model").exists()


def test_restart_from_base_differs_from_continue(tmp_path):
    common = {"iterations": 2, "steps": [2, 2]}
    run(tiny_config(tmp_path / "restart", training=common))
    run(tiny_config(tmp_path / "continue", training={**common, "restart_from_base": False}))
    restart, cont = weights(tmp_path / "restart", 1), weights(tmp_path / "continue", 1)
    base = load_file(Path(tmp_path / "restart" / "iter-0" / "model" / "model.safetensors"))
    assert any(not torch.equal(restart[k], cont[k]) for k in restart)
    assert all(k in base for k in restart)


def test_lora_bf16_rmsprop_col_linear_tensorboard(tmp_path):
    summary = run(
        tiny_config(
            tmp_path,
            precision="bf16",
            tensorboard=True,
            training={
                "direction": "col",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "optimizer": {"name": "rmsprop", "lr": 1e-3, "schedule": "linear", "warmup_steps": 1},
            },
            constitutions={"set": "pool", "scheme": "opposite", "n": 3},
        )
    )
    adapter = weights(tmp_path)
    assert adapter and all("lora_" in k for k in adapter)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if m["kind"] == "train"]
    assert lrs == pytest.approx([0.5e-3, 1e-3, 0.5e-3])  # warm-up 1 step, then linear decay to 0 at step 3
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if m["kind"] == "train")
    assert summary["heldout_mi_after"] is not None


def test_sigkill_then_rerun_ends_with_bitwise_identical_weights(tmp_path):
    config = tiny_config(tmp_path / "killed", training={"steps": [24], "checkpoint_every": 1})
    reference = tiny_config(tmp_path / "whole", training={"steps": [24], "checkpoint_every": 1})
    process = cli(config, tmp_path, name="killed.yaml")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.exists() and latest.read_text().strip() >= "step-00000003") and process.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "iter-0" / "model").exists()
    resumed = cli(config, tmp_path, name="killed.yaml")
    whole = cli(reference, tmp_path, name="whole.yaml")
    for p in (resumed, whole):
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output
    a, b = weights(tmp_path / "killed"), weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: [
        m["loss"]
        for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())  # noqa: E731
        if m["kind"] == "train"
    ]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 24


def test_corrupt_checkpoint_is_refused(tmp_path):
    config = tiny_config(tmp_path, training={"steps": [2], "checkpoint_every": 1, "keep_checkpoints": 2})
    run(config)
    weights_file = tmp_path / "checkpoints" / "step-00000002" / "weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-3] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    import shutil

    shutil.rmtree(tmp_path / "iter-0" / "model")  # so that the re-run needs the checkpoint
    with pytest.raises(CheckpointError, match="step-00000002 is corrupt: weights.safetensors sha256 mismatch"):
        run(config)
    process = cli(config, tmp_path, name="run.yaml")
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0 and "sha256 mismatch" in output and "Traceback" not in output


def test_torchrun_two_processes_equal_one(tmp_path):
    """2 processes x 2 queries (micro-batches of 1, so accumulation too) == 1 process x 4 queries, to 1e-6."""
    # AdamW divides each element's gradient by its own running magnitude (+ eps), so where a gradient element is
    # pure fp32 rounding noise (|g| ~ 1e-9: embedding rows of unused tokens) the two runs' different reduction
    # orders give updates that differ by a fraction of lr. eps = 1e-6 bounds that amplification for noise-level
    # elements while real gradient elements (~1e-5 and up here) still move by ~lr = 1e-5 per step, so a wrong
    # gradient (a dropped or mis-weighted micro-batch) still shows far above the 1e-6 tolerance.
    training = {"steps": [3], "optimizer": {"lr": 1e-5, "eps": 1e-6}}
    one = tiny_config(tmp_path / "one", training={**training, "micro_batch_queries": 4})
    two = tiny_config(tmp_path / "two", training={**training, "micro_batch_queries": 1})
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    processes = [cli(one, tmp_path, name="one.yaml"), cli(two, tmp_path, *torchrun, name="two.yaml")]
    for p in processes:
        output = p.communicate(timeout=600)[0]
        assert p.returncode == 0, output
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    base = load_file(tiny_random_path() / "model.safetensors")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 2e-5  # training moved the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    metrics = lambda out: [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    for m1, m2 in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert m1["kind"] == m2["kind"] and m1["step"] == m2["step"]
        assert abs(m1.get("loss", 0) - m2.get("loss", 0)) < 1e-6 and abs(m1["mi"] - m2["mi"]) < 1e-6
        if m1["step"] == 1 and m1["kind"] == "train":  # the same weights: the same gradient
            assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


def test_sami_trainer_in_transformers_trainer(tmp_path):
    """SAMITrainer: loss = fused SAMI loss; 2 accumulation steps of 1 query == 1 step of 2 queries (SGD)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from sami_kernels.integrations.hf_trainer import SAMITrainer

    path = tiny_random_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    items = [
        {
            "query": "How do I keep basil fresh?",
            "constitutions": ["Be helpful.", "Be unhelpful."],
            "responses": [" Put it in water.", " Basil exists."],
        },
        {
            "query": "How to warm up?",
            "constitutions": ["Be helpful.", "Be vague."],
            "responses": [" Jog slowly for five minutes.", " Things happen."],
        },
    ]

    def train(batch, accumulation):
        model = AutoModelForCausalLM.from_pretrained(path)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"hf-{batch}"),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.5,
            lr_scheduler_type="constant",
            optim="sgd",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            dataloader_drop_last=False,
            seed=0,
        )
        trainer = SAMITrainer(model=model, args=args, train_dataset=items, processing_class=tokenizer)
        trainer.train()
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    one_step, accumulated = train(2, 1), train(1, 2)
    base = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    assert any(not torch.equal(one_step[k], base[k]) for k in base)
    for k in one_step:
        torch.testing.assert_close(one_step[k], accumulated[k], rtol=0, atol=1e-6)


def test_hf_trainer_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/sami_hf_trainer.py", "--model", "tiny-random", "--queries", "6", "--steps", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: SAMI loss" in result.stdout


def test_output_dir_of_another_config_is_refused(tmp_path):
    run(tiny_config(tmp_path, training={"steps": [1]}))
    run(tiny_config(tmp_path, training={"steps": [1]}, progress=True))  # display keys may change
    with pytest.raises(ValueError, match=r"different config \(sections \['training'\] differ\)"):
        run(tiny_config(tmp_path, training={"steps": [1], "optimizer": {"lr": 1e-4}}))
