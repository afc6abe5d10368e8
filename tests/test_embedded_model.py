"""The embedded SmolLM2-135M-Instruct end to end: conversion into a fresh cache (replacing a stale partial
directory), the fused SAMI matrix against the naive full-logits computation, and the `demo` command."""

import os
import subprocess
import sys

import pytest
import torch

import sami_kernels as sk
from sami_kernels.cli import demo
from sami_kernels.engine import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    stale = cache / models.SMOLLM2_DIRNAME
    stale.mkdir()
    (stale / "model.safetensors").write_text("half-written by a killed run")
    os.environ["SAMI_KERNELS_CACHE"] = str(cache)
    try:
        model, tokenizer = models.load_smollm2()
    finally:
        del os.environ["SAMI_KERNELS_CACHE"]
    return model.eval(), tokenizer, cache


def test_conversion_replaces_a_partial_directory(smollm2):
    model, _, cache = smollm2
    converted = cache / models.SMOLLM2_DIRNAME
    assert (converted / "conversion-complete").exists()
    assert (converted / "model.safetensors").stat().st_size > 100_000_000
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 576


def test_pair_engine_matrix_equals_naive_full_logits(smollm2):
    model, tokenizer, _ = smollm2
    batch = sk.PairBatch.from_texts(tokenizer, demo.QUERIES, demo.CONSTITUTIONS, demo.RESPONSES)
    B, N = batch.num_queries, batch.num_constitutions
    with torch.no_grad():
        loss, M = sk.sami_step_loss(model, batch)
        naive = torch.zeros(B, N, N, dtype=torch.float64)
        for b in range(B):
            for i in range(N):
                for j in range(N):
                    prompt, response = batch.prompt_ids[b][i], batch.response_ids[b][j]
                    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
                    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
                    naive[b, i, j] = logp.gather(-1, torch.tensor(response)[:, None]).mean()
    torch.testing.assert_close(M.double(), naive, atol=2e-4, rtol=0)  # float32 model vs float64 softmax
    assert loss.item() == pytest.approx(sk.reference.infonce_loss(naive).item(), abs=2e-4)


def test_demo_command_prints_matrices_and_loss(smollm2):
    env = dict(os.environ, SAMI_KERNELS_CACHE=str(smollm2[2]), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "sami_kernels", "demo"], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("M[i, j] = mean log p(response_j | constitution_i)") == 2
    assert "SAMI loss (two-sided InfoNCE" in out.stdout and "MI lower bound" in out.stdout


def test_sami_steps_example_raises_the_mutual_information_bound(smollm2):
    env = dict(os.environ, SAMI_KERNELS_CACHE=str(smollm2[2]), HF_HUB_OFFLINE="1")
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "sami_steps.py")
    out = subprocess.run(
        [sys.executable, example, "--steps", "2"], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    bounds = [float(line.split("MI bound ")[1].split()[0]) for line in out.stdout.splitlines() if "MI bound" in line]
    assert len(bounds) == 2 and bounds[1] > bounds[0]
