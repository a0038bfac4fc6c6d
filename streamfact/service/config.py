"""The daemon's configuration: one TOML file, validated at start-up.

Every key, its type, default and meaning is declared once in :data:`KEYS`;
validation, defaults and ``streamfact serve --help`` all read that table, so
the documentation cannot drift from the code. An error names the bad key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

__all__ = ["KEYS", "ConfigError", "ServeConfig", "describe_keys", "load_config"]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


@dataclass(frozen=True)
class Key:
    name: str  # "section.key"
    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


KEYS: tuple[Key, ...] = (
    Key("source.kind", str, "parquet", "where events come from", ("parquet", "kafka")),
    Key("source.path", str, "", "Parquet folder to follow (default: the bundled Debian graph)"),
    Key("source.follow", bool, True, "keep watching the folder for new files"),
    Key(
        "source.stop_after_idle",
        (float, int),
        0.0,
        "Parquet: exit after this many idle seconds with no new file (0 = never)",
        minimum=0,
    ),
    Key("source.batch_size", int, 8192, "events per record batch", minimum=1),
    Key("source.poll_interval", (float, int), 1.0, "seconds between folder polls", minimum=0.01),
    Key("source.topic", str, "", "Kafka topic (kind = kafka)"),
    Key("source.bootstrap", str, "", "Kafka bootstrap servers, e.g. 127.0.0.1:9092"),
    Key("source.group", str, "", "Kafka consumer group (offsets are committed after checkpoints)"),
    Key("source.format", str, "arrow", "Kafka message format", ("arrow", "json")),
    Key("source.partitions", list, [], "Kafka partitions to assign (empty = all, or group mode)"),
    Key("events.kind", str, "edges", "event schema", ("edges", "interactions")),
    Key("events.row", str, "", "row-key column (default: src for edges, user for interactions)"),
    Key(
        "events.column",
        str,
        "",
        "column-key column (default: dst for edges, item for interactions)",
    ),
    Key(
        "events.weight",
        str,
        "",
        "weight column; empty = every event weighs 1 (the bundled Debian graph uses 'weight')",
    ),
    Key("events.key_type", str, "str", "type of the key columns", ("str", "int")),
    Key("model.rank", int, 32, "rank k of the truncated SVD", minimum=1),
    Key(
        "model.method",
        str,
        "auto",
        "IncrementalSVD update method",
        ("auto", "zha-simon", "deng", "gkl", "rpi"),
    ),
    Key("model.dtype", str, "float64", "floating-point precision", ("float64", "float32")),
    Key("model.device", str, "cpu", "cpu, torch, cuda or auto"),
    Key(
        "model.refine_growth",
        (float, int),
        0.02,
        "refine against the retained matrix when events grew by this fraction (0 = never)",
        minimum=0,
    ),
    Key("model.oversample", int, 0, "extra refinement directions (0 = 3·rank/4)", minimum=0),
    Key(
        "model.refine_every_seconds",
        (float, int),
        1.0,
        "before publishing a snapshot, also refine if the last refinement is this many "
        "seconds old and events arrived since (or it has not settled yet), so a slow "
        "stream is served refined embeddings (0 = only the refine_growth schedule; then "
        "replays are bit-reproducible)",
        minimum=0.0,
    ),
    Key("checkpoint.path", str, "streamfact-state/checkpoints", "checkpoint directory"),
    Key("checkpoint.every_rows", int, 200_000, "checkpoint after this many events", minimum=1),
    Key("checkpoint.every_seconds", (float, int), 30.0, "and at least this often", minimum=0.1),
    Key("checkpoint.keep", int, 3, "checkpoints kept on disk", minimum=1),
    Key("snapshots.path", str, "streamfact-state/snapshots", "versioned Parquet snapshots"),
    Key(
        "snapshots.every_seconds",
        (float, int),
        5.0,
        "publish a new in-memory snapshot (what the HTTP API serves) at most this often",
        minimum=0.0,
    ),
    Key(
        "snapshots.write_every_seconds",
        (float, int),
        60.0,
        "write a published snapshot to Parquet at most this often (and always at shutdown)",
        minimum=0.0,
    ),
    Key("snapshots.keep", int, 3, "snapshot versions kept on disk", minimum=1),
    Key("http.host", str, "127.0.0.1", "address the HTTP API binds to"),
    Key("http.port", int, 8737, "HTTP port (0 = any free port)", minimum=0),
    Key(
        "errors.policy",
        str,
        "skip",
        "bad events: raise, skip or dead_letter",
        ("raise", "skip", "dead_letter"),
    ),
    Key(
        "errors.dead_letter_path",
        str,
        "streamfact-state/rejected",
        "Parquet folder for dead letters",
    ),
)

_BY_NAME = {k.name: k for k in KEYS}


class ServeConfig:
    """Validated configuration; read values as ``cfg["section.key"]``."""

    def __init__(self, values: Mapping[str, Any], base: Path) -> None:
        self._values = dict(values)
        self.base = base

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def path(self, name: str) -> Path:
        """A path value, relative to the config file's folder."""
        p = Path(self._values[name])
        return p if p.is_absolute() else self.base / p

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def row_column(self) -> str:
        return self["events.row"] or ("src" if self["events.kind"] == "edges" else "user")

    @property
    def col_column(self) -> str:
        return self["events.column"] or ("dst" if self["events.kind"] == "edges" else "item")

    @property
    def uses_bundled_data(self) -> bool:
        return self["source.kind"] == "parquet" and not self["source.path"]

    @property
    def weight_column(self) -> str | None:
        if self["events.weight"]:
            return str(self["events.weight"])
        return "weight" if self.uses_bundled_data else None

    @property
    def source_path(self) -> Path:
        if self["source.path"]:
            return self.path("source.path")
        return EXAMPLES / "data" / "debian-deps"


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"top-level key {section!r} must be a [section] table")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _check(key: Key, value: Any) -> Any:
    types = key.type if isinstance(key.type, tuple) else (key.type,)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{key.name}: expected {key.type}, got a boolean")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types)
        raise ConfigError(f"{key.name}: expected {names}, got {type(value).__name__} {value!r}")
    if key.choices is not None and value not in key.choices:
        raise ConfigError(f"{key.name}: {value!r} is not one of {list(key.choices)}")
    if key.minimum is not None and float(cast(float, value)) < key.minimum:
        raise ConfigError(f"{key.name}: {value!r} is below the minimum {key.minimum}")
    return value


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServeConfig:
    """Read and validate a TOML file (or only defaults when ``path`` is None)."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            raw = _flatten(tomllib.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {p} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        base = p.resolve().parent
    raw.update(overrides or {})
    unknown = sorted(set(raw) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (valid keys: streamfact serve --help)")
    values = {k.name: _check(k, raw[k.name]) if k.name in raw else k.default for k in KEYS}
    if values["source.kind"] == "kafka":
        for needed in ("source.topic", "source.bootstrap"):
            if not values[needed]:
                raise ConfigError(f"{needed}: required when source.kind = 'kafka'")
    return ServeConfig(values, base)


def describe_keys() -> str:
    """Every key with type, default and meaning (used by ``serve --help``)."""
    lines = []
    section = ""
    for key in KEYS:
        sec, name = key.name.split(".", 1)
        if sec != section:
            lines.append(f"[{sec}]")
            section = sec
        types = key.type if isinstance(key.type, tuple) else (key.type,)
        kind = "/".join(t.__name__ for t in types)
        choices = f" one of {list(key.choices)};" if key.choices else ""
        lines.append(f"  {name} ({kind}, default {key.default!r}):{choices} {key.help}")
    return "\n".join(lines)
