"""Run-directory checkpoints hold tensors and plain data only: they load with
``weights_only=True``, a crafted pickle is never executed, and a damaged file gets an error that
names it and the way out."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from batchnorm.experiments import runner


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(3)
    runner.seed_everything(7)
    runner.save_checkpoint(tmp_path / "c.pt", step=5, generators=[g], extra=[1, 2.5, "x"])
    want = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g))
    random.seed(0), np.random.seed(0), torch.manual_seed(0), g.manual_seed(0)  # scramble
    torch.load(tmp_path / "c.pt", weights_only=True)  # plain torch can read it safely
    ckpt = runner.load_checkpoint(tmp_path / "c.pt", generators=[g])
    got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g))
    assert ckpt["step"] == 5 and ckpt["extra"] == [1, 2.5, "x"]
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM']).touch()",))


def test_a_crafted_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    flag = tmp_path / "executed"
    monkeypatch.setenv("BOOM", str(flag))
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "rng": None, "payload": _Boom()}, path)
    with pytest.raises(runner.CheckpointError, match=str(path)):
        runner.load_checkpoint(path)
    assert not flag.exists()
    pickle.loads(pickle.dumps(_Boom()))  # control: unpickling it really does run the code
    assert flag.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", None], ids=["empty", "garbage", "truncated"])
def test_a_damaged_checkpoint_names_the_file_and_the_way_out(tmp_path, content):
    path = tmp_path / "checkpoint.pt"
    runner.save_checkpoint(path, step=3, model={"w": torch.randn(100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(runner.CheckpointError, match="delete it|Delete it") as e:
        runner.load_checkpoint(path)
    assert str(path) in str(e.value)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(runner.CheckpointError, match="not a checkpoint"):
        runner.read_checkpoint(path)
