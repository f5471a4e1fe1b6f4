"""The ``batchnorm`` command.

    batchnorm reproduce NAME [--field-name VALUE ...] [--quick] [--out DIR] [--resume | --overwrite]
                             [--quiet]
    batchnorm report DIR

``reproduce`` options come from the experiment's ``Config`` dataclass: each field ``foo_bar``
is ``--foo-bar`` (bool fields: ``--foo-bar/--no-foo-bar``; ``metadata["choices"]`` restricts
the values). Unknown options and bad values exit with status 2 and a message saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

from .engine.launch import RankStopped
from .engine.runner import CheckpointError, exit_worker, under_torchrun
from .experiments import EXPERIMENTS, load_experiment

__all__ = ["build_parser", "main"]

_CONVERT = {int: int, float: float, str: str}


def _kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


def _typed(tp: type, name: str):
    def convert(text: str):
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {tp.__name__} for --{name}, got {text!r}"
            ) from None

    convert.__name__ = tp.__name__
    return convert


def _help(text: str, default: object) -> str:
    """The field's help plus its default, once: not when the text already states the default,
    nor "None" (the text says what an unset option means)."""
    if default is None or "default" in text:
        return text
    return f"{text} (default: {default})"


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--kebab-case`` option per field of the dataclass ``cls`` (default: unset)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        helptext = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        opt = _kebab(f.name)
        if tp is bool:
            parser.add_argument(
                opt,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(helptext, default),
            )
            continue
        origin = typing.get_origin(tp)
        if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else str
        if tp not in _CONVERT:
            continue  # complex fields are config-file only
        parser.add_argument(
            opt,
            dest=f.name,
            type=_typed(tp, f.name.replace("_", "-")),
            choices=f.metadata.get("choices"),
            default=None,
            metavar=f.metadata.get("metavar", tp.__name__.upper()),
            help=_help(helptext, default),
        )


def announce_quick(cls: type, command: str) -> None:
    """Say on stderr what ``--quick`` changes (data and scale), so its numbers are not read as the
    full run's."""
    full, quick = dataclasses.asdict(cls()), dataclasses.asdict(cls.quick())
    changed = ", ".join(
        f"{k}={quick[k]!r} (full run: {full[k]!r})" for k in quick if quick[k] != full[k]
    )
    print(
        f"batchnorm {command} --quick: a small run, not the paper's scale; it sets {changed}",
        file=sys.stderr,
    )


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; only the experiment named in ``argv`` (if any) is imported."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = argv[1] if len(argv) > 1 and argv[0] == "reproduce" else None
    p = argparse.ArgumentParser(
        prog="batchnorm",
        allow_abbrev=False,
        description="Batch Normalization (Ioffe & Szegedy 2015): the paper's experiments.",
    )
    from batchnorm import __version__

    p.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    rep = sub.add_parser(
        "reproduce",
        help="run one of the paper's experiments",
        allow_abbrev=False,
        description="Run an experiment; `batchnorm reproduce NAME --help` lists its options.",
    )
    rsub = rep.add_subparsers(dest="experiment", metavar="NAME", required=True)
    for name in sorted(EXPERIMENTS):
        if name != chosen:  # importing every experiment would be slow and fragile
            rsub.add_parser(name, help=f"see `batchnorm reproduce {name} --help`", add_help=False)
            continue
        mod = load_experiment(name)
        doc = (mod.__doc__ or "").strip().splitlines()
        ep = rsub.add_parser(
            name,
            help=doc[0] if doc else name,
            allow_abbrev=False,
            description=doc[0] if doc else None,
        )
        add_config_options(ep, mod.Config)
        ep.add_argument(
            "--quick",
            action="store_true",
            help="a small CI-sized run (prints the settings it changes); its numbers "
            "are not the paper's scale",
        )
        ep.add_argument(
            "--out", type=Path, default=None, help=f"run directory (default: runs/{name})"
        )
        ep.add_argument(
            "--resume", action="store_true", help="continue the run in --out from its checkpoint"
        )
        ep.add_argument(
            "--overwrite",
            action="store_true",
            help="start the run in --out again, replacing its checkpoints, metrics and report",
        )
        ep.add_argument("--quiet", action="store_true", help="no progress bars")
        ep.set_defaults(func=_cmd_reproduce, _module=mod, _parser=ep)

    r = sub.add_parser(
        "report", help="re-render report.html from a run directory", allow_abbrev=False
    )
    r.add_argument("run_dir", type=Path, metavar="DIR")
    r.set_defaults(func=_cmd_report)

    return p


def _cmd_reproduce(args: argparse.Namespace) -> int:
    mod, parser = args._module, args._parser
    cls = mod.Config
    base = cls.quick() if args.quick else cls()
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for all
    if args.quick and lead:
        announce_quick(cls, f"reproduce {args.experiment}")
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    try:
        cfg = dataclasses.replace(base, **overrides)  # __post_init__ validates
    except (ValueError, TypeError) as e:
        parser.error(f"reproduce {args.experiment}: {e}")
    out = args.out or Path("runs") / args.experiment
    try:
        summary = mod.run(cfg, out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with the same command plus --resume (run directory {out})",
            file=sys.stderr,
        )
        return 130
    except (ValueError, FileNotFoundError, CheckpointError, RankStopped) as e:
        print(f"batchnorm reproduce {args.experiment}: error: {e}", file=sys.stderr)
        return 1
    if not summary:  # a torchrun rank other than 0: rank 0 writes and prints
        return 0
    from .engine.report import render_report

    page = render_report(out)
    if not args.quiet:
        print(mod.describe(summary))
        print(f"scale: {summary['scale']['text']}")
    print(f"report: {page.resolve()}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .engine.report import render_report

    try:
        page = render_report(args.run_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"batchnorm report: error: {e}", file=sys.stderr)
        return 1
    print(f"report: {page.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo in a subcommand's option: that subcommand's usage, not the top level's
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    code = int(args.func(args) or 0)
    if under_torchrun():  # a torchrun worker whose results are on disk
        exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
