"""Run directories are safe: checkpoints hold tensors and plain data only (they load with
``weights_only=True``, a crafted pickle is never executed, a damaged file gets an error that
names it and the way out), and ``--out`` never changes a directory that is not this
experiment's run, nor an existing run without ``--resume`` or ``--overwrite``."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle

import pytest
import torch

from batchnorm.research.engine import runner


def test_a_checkpoint_holds_tensors_and_plain_data_only(tmp_path):
    runner.save_checkpoint(
        tmp_path / "c.pt", step=5, model={"w": torch.ones(2)}, extra=[1, 2.5, "x"]
    )
    plain = torch.load(tmp_path / "c.pt", weights_only=True)  # plain torch reads it safely
    ckpt = runner.read_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == plain["step"] == 5 and ckpt["extra"] == [1, 2.5, "x"]
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['BOOM']).touch()",))


def test_a_crafted_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    flag = tmp_path / "executed"
    monkeypatch.setenv("BOOM", str(flag))
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 1, "payload": _Boom()}, path)
    with pytest.raises(runner.CheckpointError, match=str(path)):
        runner.read_checkpoint(path)
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
        runner.read_checkpoint(path)
    assert str(path) in str(e.value)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(runner.CheckpointError, match="not a checkpoint"):
        runner.read_checkpoint(path)


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.1


def _snapshot(d) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_a_directory_of_the_users_own_files_is_left_byte_for_byte(tmp_path, flags):
    (tmp_path / "config.json").write_text('{"mine": true}')
    (tmp_path / "checkpoint-bn.pt").write_bytes(b"my own file")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("thesis draft")
    before = _snapshot(tmp_path)
    with pytest.raises(runner.RunDirError, match="nothing was changed"):
        runner.prepare_run_dir(
            tmp_path,
            "fig1",
            _Cfg(),
            resume=flags.get("resume", False),
            overwrite=flags.get("overwrite", False),
        )
    assert _snapshot(tmp_path) == before


def test_another_experiments_run_is_refused(tmp_path):
    runner.prepare_run_dir(tmp_path, "lenet", _Cfg(), resume=False)
    before = _snapshot(tmp_path)
    with pytest.raises(runner.RunDirError, match="'lenet' run"):
        runner.prepare_run_dir(tmp_path, "fig1", _Cfg(), resume=False, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    runner.prepare_run_dir(tmp_path, "fig1", _Cfg(), resume=False)
    runner.save_checkpoint(tmp_path / "checkpoint-bn.pt", step=4)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "fig1-notes.txt").write_text("kept")
    before = _snapshot(tmp_path)
    with pytest.raises(runner.RunDirError, match="--resume to continue it, --overwrite"):
        runner.prepare_run_dir(tmp_path, "fig1", _Cfg(), resume=False)
    assert _snapshot(tmp_path) == before
    with pytest.raises(runner.RunDirError, match="other settings"):
        runner.prepare_run_dir(tmp_path, "fig1", _Cfg(lr=0.5), resume=True)
    runner.prepare_run_dir(tmp_path, "fig1", _Cfg(), resume=True)  # the same settings: fine
    assert (tmp_path / "checkpoint-bn.pt").exists() and (tmp_path / "metrics.jsonl").exists()
    runner.prepare_run_dir(tmp_path, "fig1", _Cfg(lr=0.5), resume=False, overwrite=True)
    assert (
        not (tmp_path / "checkpoint-bn.pt").exists() and not (tmp_path / "metrics.jsonl").exists()
    )
    assert (tmp_path / "fig1-notes.txt").read_text() == "kept"  # only the run's own files go


def test_an_empty_or_missing_directory_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "new" / "deep", tmp_path / "empty"):
        runner.prepare_run_dir(d, "fig1", _Cfg(), resume=False)
        assert runner.read_json(d / "config.json")["experiment"] == "fig1"


def test_the_cli_refuses_a_foreign_out_and_offers_the_flags(tmp_path, capsys):
    from batchnorm.research import cli

    (tmp_path / "mine.txt").write_text("x")
    before = _snapshot(tmp_path)
    rc = cli.main(["reproduce", "fig1", "--quick", "--out", str(tmp_path), "--quiet"])
    assert rc == 1 and "nothing was changed" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "fig1", "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_cli_version(capsys):
    import batchnorm
    from batchnorm.research import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert (
        e.value.code == 0
        and capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"
    )


def test_a_missing_data_dir_is_an_error_before_the_run_directory_is_made(tmp_path, capsys):
    from batchnorm.research import cli

    out = tmp_path / "run"
    rc = cli.main(
        [
            "reproduce",
            "fig1",
            "--quick",
            "--data-dir",
            str(tmp_path / "nope"),
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and "--data-dir" in err and "not a directory" in err
    assert not out.exists()


_ORPHAN_SCRIPT = """
import multiprocessing as mp, os, sys, time
from batchnorm.research.engine.runner import die_with_parent

def work(path):
    die_with_parent()
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    mp.get_context("spawn").Process(target=work, args=(sys.argv[1],)).start()
    time.sleep(60)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="prctl is Linux's")
def test_a_worker_dies_with_its_parent_even_on_sigkill(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script, pidfile = tmp_path / "parent.py", tmp_path / "child.pid"
    script.write_text(_ORPHAN_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(pidfile)])
    try:
        end = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < end:
            time.sleep(0.1)
        child = int(pidfile.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the worker outlived its SIGKILLed parent")
    finally:
        parent.kill()


def test_quick_says_what_data_and_scale_it_uses(tmp_path, capsys):
    from batchnorm.research import cli
    from batchnorm.research.experiments import fig1

    rc = cli.main(["reproduce", "fig1", "--quick", "--out", str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "--quick: a small run, not the paper's scale" in err
    full, quick = fig1.Config(), fig1.Config.quick()
    for f in dataclasses.fields(fig1.Config):
        if getattr(full, f.name) != getattr(quick, f.name):
            assert f"{f.name}={getattr(quick, f.name)!r}" in err


def test_a_typo_in_a_subcommand_option_shows_that_subcommands_usage(capsys):
    from batchnorm.research import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "fig1", "--stpes", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --stpes 5" in err
    assert "usage: batchnorm reproduce fig1" in err
