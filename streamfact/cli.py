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


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from streamfact.service.config import ConfigError, load_config

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["http.host"] = args.host
    if args.port is not None:
        overrides["http.port"] = args.port
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"streamfact serve: {exc}", file=sys.stderr)
        return 2
    from streamfact.service.daemon import EmbeddingDaemon

    return EmbeddingDaemon(cfg).run()


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
    from streamfact.service.config import describe_keys

    p = sub.add_parser(
        "serve",
        help="run the embedding-update daemon",
        description="Keep row and column embeddings fresh from interaction or edge events "
        "(a followed Parquet folder or a Kafka topic) with an incremental truncated SVD. "
        "With no --config it follows the Debian dependency graph bundled in examples/.",
        epilog="configuration keys (TOML, [section] key = value):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--host", help="override http.host")
    p.add_argument("--port", type=int, help="override http.port")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_cmd_serve)
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
