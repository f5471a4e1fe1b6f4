"""The ``batchnorm`` command: option parsing, clear errors, an end-to-end quick run."""

from __future__ import annotations

import json

import pytest

from batchnorm.research import cli


def _fails(capsys, argv, *needles, status=2):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == status
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_option_is_rejected(capsys):
    _fails(capsys, ["reproduce", "fig1", "--stpes", "10"], "unrecognized arguments: --stpes")


def test_abbreviations_are_not_guessed(capsys):
    _fails(capsys, ["reproduce", "fig1", "--step", "10"], "--step")


def test_unknown_experiment_lists_choices(capsys):
    _fails(capsys, ["reproduce", "fig9"], "invalid choice: 'fig9'", "fig1")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "ten"], "expected int for --steps, got 'ten'"),
        (["--lr", "fast"], "expected float for --lr, got 'fast'"),
        (["--dataset", "cifar"], "invalid choice: 'cifar'"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--batch-size", "1"], "batch_size must be at least 2"),
    ],
)
def test_bad_values_get_clear_errors(capsys, tmp_path, argv, needle):
    _fails(capsys, ["reproduce", "fig1", *argv, "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists()  # nothing written


def test_help_lists_config_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "fig1", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--dataset",
        "--data-dir",
        "--steps",
        "--batch-size",
        "--lr",
        "--seed",
        "--out",
        "--resume",
        "--quiet",
        "--quick",
    ):
        assert opt in out


def test_missing_data_is_a_clear_error_not_a_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_NO_DOWNLOAD", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHNORM_DATA", raising=False)
    (tmp_path / "none").mkdir()  # an existing folder without the files
    code = cli.main(
        [
            "reproduce",
            "fig1",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "mnist is not available" in err and "--dataset digits" in err
    assert not (tmp_path / "o").exists()


def test_report_of_a_non_run_directory(capsys, tmp_path):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "is not a finished run directory" in capsys.readouterr().err


def test_quick_run_end_to_end_then_report(capsys, tmp_path):
    out = tmp_path / "run"
    code = cli.main(
        [
            "reproduce",
            "fig1",
            "--quick",
            "--steps",
            "100",
            "--eval-every",
            "50",
            "--seed",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {(out / 'report.html').resolve()}" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["experiment"] == "fig1" and cfg["config"]["steps"] == 100 and cfg["config"]["seed"] == 3
    )
    assert cfg["config"]["dataset"] == "digits"  # from Config.quick()
    assert "torch" in cfg["env"]
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").stat().st_size > 10_000


def test_one_default_per_option_across_commands(capsys):
    """The options every experiment shares come from one base class each (seed; the digit data
    sets; the device options), are never redefined, and the run's infrastructure options have
    one default wherever they appear; help states each default once."""
    import dataclasses

    from batchnorm.research.engine.config import DataConfig, DeviceConfig, RunConfig
    from batchnorm.research.experiments import EXPERIMENTS, load_experiment

    bases = {f.name: f for c in (DataConfig, DeviceConfig) for f in dataclasses.fields(c)}
    infrastructure = {"threads": 1, "workers": None, "loader_workers": None, "quiet": None}
    defaults: dict[str, set] = {}
    for name in EXPERIMENTS:
        cls = load_experiment(name).Config
        assert issubclass(cls, RunConfig), name
        for f in dataclasses.fields(cls):
            if f.name in bases:  # never redefined with another default
                assert f.default == bases[f.name].default, (name, f.name)
                if issubclass(cls, DataConfig):  # nor another meaning
                    assert f.metadata == bases[f.name].metadata, (name, f.name)
            if f.name in infrastructure:
                defaults.setdefault(f.name, set()).add(f.default)
        with pytest.raises(SystemExit):
            cli.main(["reproduce", name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: None)" not in text and "Config.quick" not in text, name
        if issubclass(cls, DataConfig):
            assert text.count("(default: auto)") == 1 + issubclass(cls, DeviceConfig), name
    assert all(len(v) == 1 for v in defaults.values()), defaults
