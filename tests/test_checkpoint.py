import json
import random
import shutil

import numpy as np
import pytest
import torch

from sami_kernels.recipes.checkpoint import CheckpointError, load_latest, rng_state, save_checkpoint, set_rng_state


def assert_same(actual, expected):
    """Recursive bit-for-bit equality of nested tensors, dicts, lists, tuples and plain values."""
    assert type(actual) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same(actual[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    else:
        assert actual == expected


def make_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, x):
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()
    scheduler.step()


def test_round_trip_tensors_and_optimizer_state(tmp_path):
    model, optimizer, scheduler = make_training()
    x = torch.randn(5, 4)
    for _ in range(2):
        train_step(model, optimizer, scheduler, x)
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "i64": torch.arange(-3, 9, dtype=torch.int64),
        "transposed": torch.randn(4, 6).t(),
        **model.state_dict(),
    }
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": 3, "tag": None}
    save_checkpoint(tmp_path, 2, tensors, state)

    step, loaded_tensors, loaded_state = load_latest(tmp_path)
    assert step == 2
    assert_same(loaded_tensors, tensors)
    assert_same(loaded_state, state)

    restored, restored_optimizer, restored_scheduler = make_training(seed=1)
    restored.load_state_dict({name: loaded_tensors[name] for name in ("weight", "bias")})
    restored_optimizer.load_state_dict(loaded_state["optimizer"])
    restored_scheduler.load_state_dict(loaded_state["scheduler"])
    train_step(model, optimizer, scheduler, x)
    train_step(restored, restored_optimizer, restored_scheduler, x)
    assert_same(restored.state_dict(), model.state_dict())
    assert restored_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    step, tensors, state = load_latest(tmp_path)
    assert (step, tensors["w"].tolist(), state) == (4, [4.0, 4.0], {"step": 4})


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, {"w": torch.zeros(3)}, {"version": 1})
    path = save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {"version": 2})
    assert path == tmp_path / "step-00000005"
    step, tensors, state = load_latest(tmp_path)
    assert (step, tensors["w"].tolist(), state) == (5, [1.0, 1.0, 1.0], {"version": 2})


def test_fresh_start_returns_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None


def test_stale_temp_directory_is_ignored_then_removed(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {})
    stale = tmp_path / ".tmp-step-00000002-crashed"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"partial")
    assert load_latest(tmp_path)[0] == 1
    save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, {})
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert load_latest(tmp_path)[0] == 2


def flip_weights_byte(directory):
    path = directory / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def drop_manifest_entry(directory):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["files"]["state.pt"]
    path.write_text(json.dumps(manifest))


def truncate_state(directory):
    path = directory / "state.pt"
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (flip_weights_byte, "weights.safetensors sha256 mismatch"),
        (truncate_state, "state.pt size mismatch"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
        (drop_manifest_entry, "does not list state.pt"),
        (shutil.rmtree, "does not exist"),
    ],
)
def test_corruption_is_refused(tmp_path, corrupt, problem):
    directory = save_checkpoint(tmp_path, 3, {"w": torch.randn(8)}, {"step": 3})
    corrupt(directory)
    with pytest.raises(CheckpointError) as error:
        load_latest(tmp_path)
    assert f"checkpoint {directory} is corrupt" in str(error.value)
    assert problem in str(error.value)


def draws():
    return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()


def test_rng_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path, 1, {}, {"rng": rng_state()})
    expected = draws()
    assert draws() != expected
    set_rng_state(load_latest(tmp_path)[2]["rng"])
    assert draws() == expected
