"""The ``streamfact`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_inspect(args: argparse.Namespace) -> int:
    from streamfact.checkpoint import CorruptCheckpointError, describe

    try:
        print(describe(args.path))
    except (FileNotFoundError, CorruptCheckpointError) as exc:
        print(f"streamfact inspect: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_version(args: argparse.Namespace) -> int:
    import streamfact

    print(streamfact.__version__)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamfact",
        description="Online matrix factorization over Arrow record-batch streams.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="print a checkpoint's manifest, with array sizes")
    p.add_argument("path", help="a checkpoint store directory or one checkpoint directory")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("version", help="print the streamfact version")
    p.set_defaults(func=_cmd_version)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
