"""``python -m batchnorm``: the research workbench's command line (needs the ``experiments`` extra)."""

import sys


def main() -> int:
    try:
        from batchnorm.research.cli import main
    except ImportError as e:
        if "batchnorm[experiments]" not in str(e):
            raise
        print(f"batchnorm: {e}", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(main())
