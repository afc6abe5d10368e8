"""`make demo`'s configuration end to end on the embedded SmolLM2-135M (about 3 minutes): the held-out MI lower
bound rises over the run's steps and ends above zero, the judge-free adherence gap (words under "be verbose" minus
words under "be concise") of the trained model exceeds the base model's, and the summary names every output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_raises_heldout_mi_and_adherence(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sami_kernels",
            "sami",
            "--config",
            "examples/configs/sami_demo.yaml",
            "--set",
            f"output_dir={tmp_path}",
            "--set",
            "progress=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SAMI run summary" in result.stdout and "heldout_mi_after" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    heldout = [m["mi"] for m in metrics if m["kind"] == "heldout"]
    assert len(heldout) == 5  # before training, then every 2 of the 8 steps
    assert heldout[-1] > heldout[0] + 0.005 and heldout[-1] > 0, heldout
    summary = json.loads((tmp_path / "summary.json").read_text())
    concise = summary["adherence"]["concise"]
    assert concise["trained"]["gap"] > concise["base"]["gap"] + 4, concise  # measured: +1.25 -> +12.5 words
    assert concise["trained"]["follow"] < concise["base"]["follow"], concise
    assert 0 <= summary["judge_win_rate"] <= 1
    for key in ("model", "checkpoints", "metrics", "plot", "judge", "adherence_responses"):
        assert Path(summary[key]).exists(), key
