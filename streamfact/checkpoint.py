"""Atomic, checksummed checkpoints of operator states and source positions.

A checkpoint saves every operator's :class:`~streamfact.operators.base.OperatorState`
together with the source position (and sink states, counters and free-form
extras) in one atomic step, so that after a crash the engine restores the
latest checkpoint, seeks the source back to its position and replays: the
resulting state equals that of an uninterrupted run.

On-disk format
--------------
A store is a directory ``root/``::

    root/
      LATEST                  pointer: "ckpt-0000000007\\n" "manifest-sha256 <hex>\\n"
      ckpt-0000000006/        one complete checkpoint per sequence number
      ckpt-0000000007/
        manifest.json
        op0-arr0.npy          one .npy file per state array (np.save, allow_pickle=False)
        op0-arr1.npy
        op1-arr0.npy
      .tmp-ckpt-8-4711/       a checkpoint being written (or left by a crash)

``manifest.json`` is a JSON object::

    {
      "format": "streamfact-checkpoint",
      "format_version": 1,
      "sequence": 7,
      "created": <unix time, float>,
      "streamfact_version": "0.1.0",
      "operators": {
        "<name>": {
          "class": "streamfact.operators.moments.RunningMoments",
          "params": <state.meta["params"] or null>,
          "meta": <state.meta, JSON>,
          "arrays": {
            "<array name>": {"file": "op0-arr0.npy", "dtype": "<f8",
                             "shape": [5], "sha256": "<hex of the whole .npy file>",
                             "nbytes": 40}
          }
        }
      },
      "source_position": {...}, "sink_states": {...}, "counters": {...}, "extra": {...},
      "manifest_sha256": "<hex>"
    }

Array names may hold any character, so files are named by index
(``op{i}-arr{j}.npy``) and the real names live only in the manifest.
``manifest_sha256`` is the sha256 of the canonical JSON (sorted keys, compact
separators) of every other field, so a manifest edited into another valid
JSON document is still detected. The ``LATEST`` pointer repeats the sha256 of
the manifest file's bytes.

Only numeric, boolean, datetime and fixed-width byte/unicode dtypes are
stored. Object and structured dtypes are refused when saving, and loading
parses the ``.npy`` header itself (``numpy.lib.format``, which evaluates only
Python literals) and maps the raw bytes with ``numpy.frombuffer``: no pickle
and no code named by the file is ever run. Operator classes are imported only
by :func:`instantiate`, and only from inside the ``streamfact`` package.

Crash safety
------------
:meth:`CheckpointStore.save` proceeds in steps, and a crash (power loss,
SIGKILL, an exception) between any two of them leaves a readable store:

1. Every array and then the manifest is written into a fresh
   ``.tmp-ckpt-{seq}-{pid}/`` directory; each file is fsynced, then the
   directory itself. A crash here leaves only a ``.tmp-*`` directory, which
   readers ignore and the next save deletes.
2. The directory is renamed to ``ckpt-{seq:010d}`` (atomic on POSIX) and the
   root is fsynced. Every ``ckpt-*`` directory is therefore complete: it either
   exists with all its files durable, or not at all.
3. ``LATEST`` is rewritten via ``LATEST.tmp`` + fsync + ``os.replace`` + fsync
   of the root, so it names either the old or the new checkpoint, never a torn
   mix. The pointer is the commit point: until it is replaced, readers keep
   using the previous checkpoint even though the new directory already exists.
4. Old checkpoints beyond ``keep`` are pruned: each is first renamed to a
   ``.del-*`` name (so a half-deleted directory never looks like a checkpoint)
   and then removed. The one ``LATEST`` names is never pruned.

Readers (:meth:`CheckpointStore.load_latest`) trust ``LATEST`` only after the
checkpoint it names fully verifies: the manifest parses, has a known format
version and a matching checksum, and every array file exists, has the recorded
sha256, and decodes to the recorded dtype and shape. Otherwise the problem is
reported (``warnings.warn`` with :class:`CheckpointWarning` and the
``streamfact.checkpoint`` logger) and the ``ckpt-*`` directories are tried from
the newest down. Media corruption of every checkpoint raises
:class:`CorruptCheckpointError` rather than silently starting from scratch.

One store has one writer at a time.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.lib.format as npy_format

from streamfact.operators.base import Operator, OperatorState

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SAVE_STEPS",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointWarning",
    "CorruptCheckpointError",
    "OperatorEntry",
    "describe",
    "instantiate",
]

FORMAT = "streamfact-checkpoint"
FORMAT_VERSION = 1

#: The steps of :meth:`CheckpointStore.save`, in order; ``fault_hook`` is called
#: with each name right after that step completes.
SAVE_STEPS: tuple[str, ...] = (
    "tmpdir_created",
    "arrays_written",
    "manifest_written",
    "tmpdir_synced",
    "renamed",
    "root_synced",
    "pointer_tmp_written",
    "pointer_written",
    "pruned",
)

MANIFEST = "manifest.json"
POINTER = "LATEST"
_POINTER_TMP = "LATEST.tmp"
_DIR_RE = re.compile(r"^ckpt-(\d{10,})$")
_TMP_RE = re.compile(r"^\.(?:tmp|del)-ckpt-\d+-(\d+)$")
_FILE_RE = re.compile(r"^op\d+-arr\d+\.npy$")
_CLASS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
#: dtype kinds allowed in a checkpoint: bool, ints, floats, complex, datetimes, bytes, str.
_ALLOWED_KINDS = frozenset("biufcmMSU")
_CHUNK = 1 << 20

logger = logging.getLogger("streamfact.checkpoint")


class CorruptCheckpointError(ValueError):
    """A checkpoint that is missing, torn, tampered with, or not a checkpoint."""


class CheckpointWarning(UserWarning):
    """A corrupt checkpoint or pointer was skipped in favour of an older one."""


@dataclass
class OperatorEntry:
    """One operator in a checkpoint: its importable class path and its state."""

    class_path: str
    state: OperatorState

    @classmethod
    def from_operator(cls, op: Operator) -> OperatorEntry:
        """The entry for a live operator: ``module.Class`` and ``op.state()``."""
        kind = type(op)
        return cls(f"{kind.__module__}.{kind.__qualname__}", op.state())


@dataclass
class Checkpoint:
    """A loaded (or just saved) checkpoint."""

    sequence: int
    path: Path
    created: float
    operators: dict[str, OperatorEntry]
    source_position: dict[str, Any]
    sink_states: dict[str, dict[str, Any]]
    counters: dict[str, Any]
    extra: dict[str, Any]


# -- small helpers ------------------------------------------------------------


def _dir_name(sequence: int) -> str:
    return f"ckpt-{sequence:010d}"


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _json_roundtrip(value: Any, where: str) -> Any:
    """``value`` as it will read back from JSON; refuses what JSON cannot hold."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not JSON-serialisable: {exc}") from exc


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this process is not writing them now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.digest.update(data)
        return self._raw.write(data)


def _check_array(arr: Any, where: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{where} is {type(arr).__name__}, not a numpy array")
    if arr.dtype.kind not in _ALLOWED_KINDS or arr.dtype.hasobject or arr.dtype.names:
        raise ValueError(
            f"{where} has dtype {arr.dtype}; checkpoints store only numeric, boolean, "
            "datetime and fixed-width string arrays (never object or structured)"
        )
    return arr


def _write_array(path: Path, arr: np.ndarray) -> str:
    with open(path, "xb") as raw:
        hashing = _HashingWriter(raw)
        np.save(hashing, arr, allow_pickle=False)  # type: ignore[arg-type]
        raw.flush()
        os.fsync(raw.fileno())
    return hashing.digest.hexdigest()


def _read_array(path: Path, info: Mapping[str, Any], where: str) -> np.ndarray:
    """Verify and decode one ``.npy`` file without any pickle code path."""
    try:
        with open(path, "rb") as f:
            # readinto a mutable buffer: one copy in memory, and writable arrays.
            buf = bytearray(os.fstat(f.fileno()).st_size)
            filled = 0
            with memoryview(buf) as view:
                while filled < len(buf):
                    n = f.readinto(view[filled:])
                    if not n:
                        break
                    filled += n
            del buf[filled:]
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: array file {path.name} is missing") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{where}: cannot read {path.name}: {exc}") from exc
    digest = hashlib.sha256(buf).hexdigest()
    if digest != info["sha256"]:
        raise CorruptCheckpointError(
            f"{where}: sha256 mismatch in {path.name} (file {digest[:12]}…, "
            f"manifest {info['sha256'][:12]}…)"
        )
    head = io.BytesIO(buf)
    try:
        version = npy_format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(head)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, EOFError) as exc:
        raise CorruptCheckpointError(f"{where}: bad .npy header in {path.name}: {exc}") from exc
    if dtype.hasobject or dtype.kind not in _ALLOWED_KINDS or dtype.names:
        raise CorruptCheckpointError(
            f"{where}: {path.name} holds dtype {dtype} (object/pickled data is never loaded)"
        )
    expected_dtype = np.dtype(info["dtype"])
    if dtype != expected_dtype or list(shape) != list(info["shape"]):
        raise CorruptCheckpointError(
            f"{where}: {path.name} holds {dtype}{list(shape)}, manifest says "
            f"{expected_dtype}{list(info['shape'])}"
        )
    offset = head.tell()
    count = math.prod(shape)
    if len(buf) - offset != count * dtype.itemsize or count * dtype.itemsize != info["nbytes"]:
        raise CorruptCheckpointError(
            f"{where}: {path.name} has {len(buf) - offset} data bytes, expected "
            f"{count * dtype.itemsize} (manifest nbytes {info['nbytes']})"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


# -- manifest validation ----------------------------------------------------------


def _require(cond: bool, where: str, reason: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"{where}: {reason}")


def _read_manifest(ckpt_dir: Path) -> tuple[dict[str, Any], bytes]:
    """Parse and structurally validate ``manifest.json``; returns (manifest, raw bytes)."""
    where = ckpt_dir.name
    try:
        raw = (ckpt_dir / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: {MANIFEST} is missing") from None
    except OSError as exc:
        raise CorruptCheckpointError(f"{where}: cannot read {MANIFEST}: {exc}") from exc
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: {MANIFEST} is not valid JSON ({exc})") from exc
    _require(isinstance(manifest, dict), where, f"{MANIFEST} is not a JSON object")
    _require(manifest.get("format") == FORMAT, where, f"not a {FORMAT} manifest")
    version = manifest.get("format_version")
    _require(
        isinstance(version, int) and version == FORMAT_VERSION,
        where,
        f"format_version {version!r} is not supported (this streamfact reads {FORMAT_VERSION})",
    )
    stored = manifest.pop("manifest_sha256", None)
    _require(isinstance(stored, str), where, "manifest_sha256 is missing")
    actual = hashlib.sha256(_canonical(manifest)).hexdigest()
    _require(actual == stored, where, "manifest checksum mismatch (manifest was altered)")
    _validate_manifest(manifest, where)
    return manifest, raw


def _validate_manifest(m: dict[str, Any], where: str) -> None:
    _require(isinstance(m.get("sequence"), int), where, "sequence is not an integer")
    _require(isinstance(m.get("created"), int | float), where, "created is not a number")
    for key in ("source_position", "sink_states", "counters", "extra", "operators"):
        _require(isinstance(m.get(key), dict), where, f"{key} is not a JSON object")
    files: set[str] = set()
    for name, op in m["operators"].items():
        ow = f"{where}: operator {name!r}"
        _require(isinstance(op, dict), ow, "entry is not a JSON object")
        _require(isinstance(op.get("class"), str), ow, "class is not a string")
        _require(isinstance(op.get("meta"), dict), ow, "meta is not a JSON object")
        _require(isinstance(op.get("arrays"), dict), ow, "arrays is not a JSON object")
        for arr_name, info in op["arrays"].items():
            aw = f"{ow} array {arr_name!r}"
            _require(isinstance(info, dict), aw, "entry is not a JSON object")
            file = info.get("file")
            _require(isinstance(file, str) and bool(_FILE_RE.match(file)), aw, "bad file name")
            _require(file not in files, aw, f"file {file} is used twice")
            files.add(file)
            _require(
                isinstance(info.get("sha256"), str) and bool(_HEX64_RE.match(info["sha256"])),
                aw,
                "bad sha256",
            )
            shape = info.get("shape")
            _require(
                isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape),
                aw,
                "bad shape",
            )
            _require(isinstance(info.get("nbytes"), int), aw, "bad nbytes")
            try:
                dtype = np.dtype(info.get("dtype"))
            except (TypeError, ValueError):
                raise CorruptCheckpointError(f"{aw}: bad dtype {info.get('dtype')!r}") from None
            _require(
                isinstance(info.get("dtype"), str)
                and dtype.kind in _ALLOWED_KINDS
                and not dtype.hasobject
                and not dtype.names,
                aw,
                f"dtype {dtype} is not allowed in a checkpoint",
            )


def _load_dir(ckpt_dir: Path, *, expect_sequence: int | None = None) -> Checkpoint:
    manifest, _ = _read_manifest(ckpt_dir)
    where = ckpt_dir.name
    if expect_sequence is not None:
        _require(
            manifest["sequence"] == expect_sequence,
            where,
            f"manifest says sequence {manifest['sequence']}, directory says {expect_sequence}",
        )
    operators: dict[str, OperatorEntry] = {}
    for name, op in manifest["operators"].items():
        arrays = {
            arr_name: _read_array(ckpt_dir / info["file"], info, f"{where}: {name}.{arr_name}")
            for arr_name, info in op["arrays"].items()
        }
        operators[name] = OperatorEntry(op["class"], OperatorState(arrays, op["meta"]))
    return Checkpoint(
        sequence=manifest["sequence"],
        path=ckpt_dir,
        created=float(manifest["created"]),
        operators=operators,
        source_position=manifest["source_position"],
        sink_states=manifest["sink_states"],
        counters=manifest["counters"],
        extra=manifest["extra"],
    )


# -- the store ----------------------------------------------------------------------


class CheckpointStore:
    """A directory of atomic, checksummed checkpoints (see the module docstring).

    Parameters
    ----------
    root:
        The store directory; created on the first :meth:`save`.
    keep:
        How many of the newest checkpoints to keep (at least 1). The checkpoint
        named by ``LATEST`` is always kept.
    fault_hook:
        Called with each name of :data:`SAVE_STEPS` right after that step of
        :meth:`save`; raising from it simulates a crash at that point (tests).

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from streamfact import RunningMoments
    >>> from streamfact.checkpoint import CheckpointStore, OperatorEntry, instantiate
    >>> rm = RunningMoments(2); rm.update(np.array([[1.0, 2.0], [3.0, 5.0]]))
    >>> with tempfile.TemporaryDirectory() as root:
    ...     store = CheckpointStore(root, keep=2)
    ...     _ = store.save(operators={"moments": OperatorEntry.from_operator(rm)},
    ...                    source_position={"row": 2})
    ...     ckpt = store.load_latest()
    ...     restored = instantiate(ckpt.operators["moments"])
    >>> ckpt.sequence, ckpt.source_position, restored.count
    (1, {'row': 2}, 2)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        keep: int = 3,
        fault_hook: Callable[[str], None] | None = None,
    ) -> None:
        if int(keep) < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)
        self.fault_hook = fault_hook
        self._problems: list[str] = []

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r}, keep={self.keep})"

    # -- listing -------------------------------------------------------------------
    def sequences(self) -> list[int]:
        """Sequence numbers of the ``ckpt-*`` directories present, ascending."""
        if not self.root.is_dir():
            return []
        out = []
        for entry in self.root.iterdir():
            match = _DIR_RE.match(entry.name)
            if match and entry.is_dir():
                out.append(int(match.group(1)))
        return sorted(out)

    @property
    def problems(self) -> list[str]:
        """Why checkpoints or the pointer were skipped by the last :meth:`load_latest`."""
        return list(self._problems)

    # -- writing ----------------------------------------------------------------------
    def _step(self, name: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(name)

    def save(
        self,
        *,
        operators: Mapping[str, OperatorEntry],
        source_position: dict[str, Any],
        sink_states: dict[str, Any] | None = None,
        counters: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Write a new checkpoint atomically and make it the latest.

        Everything is validated before anything is written: operator names and
        class paths must be strings, arrays plain numpy arrays of an allowed
        dtype, and meta, positions, sink states, counters and extras JSON-able
        (no NaN/Inf). The returned :class:`Checkpoint` holds the JSON fields as
        they will read back and the caller's arrays (not copied).
        """
        body, plan = self._prepare(operators, source_position, sink_states, counters, extra)
        self.root.mkdir(parents=True, exist_ok=True)
        sequence = self._next_sequence()
        body["sequence"] = sequence
        tmp = self.root / f".tmp-ckpt-{sequence}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        self._step("tmpdir_created")

        for op_name, arr_name, file, arr in plan:
            info = body["operators"][op_name]["arrays"][arr_name]
            info["sha256"] = _write_array(tmp / file, arr)
        self._step("arrays_written")

        body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
        manifest_bytes = json.dumps(body, indent=1, allow_nan=False).encode() + b"\n"
        with open(tmp / MANIFEST, "xb") as f:
            f.write(manifest_bytes)
            f.flush()
            os.fsync(f.fileno())
        self._step("manifest_written")
        _fsync_dir(tmp)
        self._step("tmpdir_synced")

        final = self.root / _dir_name(sequence)
        if final.exists():
            raise FileExistsError(f"{final} exists; is another process writing {self.root}?")
        os.rename(tmp, final)
        self._step("renamed")
        _fsync_dir(self.root)
        self._step("root_synced")

        pointer = f"{final.name}\nmanifest-sha256 {hashlib.sha256(manifest_bytes).hexdigest()}\n"
        with open(self.root / _POINTER_TMP, "w", encoding="ascii") as f:
            f.write(pointer)
            f.flush()
            os.fsync(f.fileno())
        self._step("pointer_tmp_written")
        os.replace(self.root / _POINTER_TMP, self.root / POINTER)
        _fsync_dir(self.root)
        self._step("pointer_written")

        self._prune(sequence)
        self._step("pruned")

        entries = {
            name: OperatorEntry(
                entry.class_path,
                OperatorState(dict(entry.state.arrays), body["operators"][name]["meta"]),
            )
            for name, entry in operators.items()
        }
        return Checkpoint(
            sequence=sequence,
            path=final,
            created=body["created"],
            operators=entries,
            source_position=body["source_position"],
            sink_states=body["sink_states"],
            counters=body["counters"],
            extra=body["extra"],
        )

    def _prepare(
        self,
        operators: Mapping[str, OperatorEntry],
        source_position: dict[str, Any],
        sink_states: dict[str, Any] | None,
        counters: dict[str, Any] | None,
        extra: dict[str, Any] | None,
    ) -> tuple[dict[str, Any], list[tuple[str, str, str, np.ndarray]]]:
        from streamfact import __version__

        plan: list[tuple[str, str, str, np.ndarray]] = []
        ops_json: dict[str, Any] = {}
        for i, (name, entry) in enumerate(operators.items()):
            if not isinstance(name, str):
                raise ValueError(f"operator names must be strings, got {name!r}")
            if not isinstance(entry, OperatorEntry):
                raise ValueError(f"operator {name!r}: expected an OperatorEntry")
            if not isinstance(entry.class_path, str) or not _CLASS_RE.match(entry.class_path):
                raise ValueError(f"operator {name!r}: bad class path {entry.class_path!r}")
            meta = _json_roundtrip(entry.state.meta, f"operator {name!r} state meta")
            if not isinstance(meta, dict):
                raise ValueError(f"operator {name!r}: state meta must be a mapping")
            arrays: dict[str, Any] = {}
            for j, (arr_name, arr) in enumerate(entry.state.arrays.items()):
                if not isinstance(arr_name, str):
                    raise ValueError(f"operator {name!r}: array names must be strings")
                arr = _check_array(arr, f"operator {name!r} array {arr_name!r}")
                file = f"op{i}-arr{j}.npy"
                arrays[arr_name] = {
                    "file": file,
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                    "sha256": "",
                    "nbytes": int(arr.nbytes),
                }
                plan.append((name, arr_name, file, arr))
            ops_json[name] = {
                "class": entry.class_path,
                "params": meta.get("params"),
                "meta": meta,
                "arrays": arrays,
            }
        body: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sequence": 0,
            "created": time.time(),
            "streamfact_version": __version__,
            "operators": ops_json,
            "source_position": _json_roundtrip(source_position, "source_position"),
            "sink_states": _json_roundtrip(sink_states or {}, "sink_states"),
            "counters": _json_roundtrip(counters or {}, "counters"),
            "extra": _json_roundtrip(extra or {}, "extra"),
        }
        for key in ("source_position", "sink_states", "counters", "extra"):
            if not isinstance(body[key], dict):
                raise ValueError(f"{key} must be a mapping")
        return body, plan

    def _pointer_sequence(self) -> int | None:
        try:
            name, _ = self._read_pointer()
        except (OSError, CorruptCheckpointError):
            return None
        match = _DIR_RE.match(name)
        return int(match.group(1)) if match else None

    def next_sequence(self) -> int:
        """The sequence number the next :meth:`save` will use (single writer)."""
        return self._next_sequence()

    def _next_sequence(self) -> int:
        known = self.sequences()
        pointed = self._pointer_sequence()
        if pointed is not None:
            known.append(pointed)
        return max(known, default=0) + 1

    def _prune(self, newest: int) -> None:
        pinned = self._pointer_sequence()
        for seq in sorted(self.sequences(), reverse=True)[self.keep :]:
            if seq in (pinned, newest):
                continue
            doomed = self.root / f".del-ckpt-{seq}-{os.getpid()}"
            if doomed.exists():
                shutil.rmtree(doomed)
            os.rename(self.root / _dir_name(seq), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for entry in self.root.iterdir():
            match = _TMP_RE.match(entry.name)
            if match and entry.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------
    def _read_pointer(self) -> tuple[str, str | None]:
        """``(directory name, manifest sha256 or None)`` from ``LATEST``."""
        raw = (self.root / POINTER).read_bytes()
        try:
            lines = raw.decode("ascii").splitlines()
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"{POINTER} is not ASCII text") from None
        if not lines or not _DIR_RE.match(lines[0].strip()):
            raise CorruptCheckpointError(f"{POINTER} does not name a checkpoint: {raw[:60]!r}")
        digest = None
        if len(lines) > 1 and lines[1].strip():
            parts = lines[1].split()
            if len(parts) != 2 or parts[0] != "manifest-sha256" or not _HEX64_RE.match(parts[1]):
                raise CorruptCheckpointError(f"{POINTER} has a malformed checksum line")
            digest = parts[1]
        return lines[0].strip(), digest

    def load(self, sequence: int) -> Checkpoint:
        """Load and fully verify checkpoint ``sequence``.

        Raises
        ------
        CorruptCheckpointError
            If it does not exist or fails any check; the message says why.
        """
        ckpt_dir = self.root / _dir_name(int(sequence))
        if not ckpt_dir.is_dir():
            raise CorruptCheckpointError(f"checkpoint {sequence} does not exist in {self.root}")
        return _load_dir(ckpt_dir, expect_sequence=int(sequence))

    def _report(self, problem: str) -> None:
        self._problems.append(problem)
        logger.warning("skipping checkpoint: %s", problem)
        warnings.warn(f"streamfact checkpoint: {problem}", CheckpointWarning, stacklevel=3)

    def load_latest(self) -> Checkpoint | None:
        """The checkpoint ``LATEST`` names, or else the newest one that verifies.

        Returns ``None`` when the store holds no checkpoint at all (a fresh
        start, or every save so far crashed before its rename). Each skipped
        pointer or checkpoint is reported and listed in :attr:`problems`.

        Raises
        ------
        CorruptCheckpointError
            If checkpoints (or a pointer) exist but none of them verifies:
            restarting from scratch would silently replay the whole stream.
        """
        self._problems = []
        present = self.sequences()
        tried: set[int] = set()
        pointer_path = self.root / POINTER
        if pointer_path.exists() or present:
            try:
                name, digest = self._read_pointer()
            except FileNotFoundError:
                self._report(f"{POINTER} pointer is missing in {self.root}")
            except (OSError, CorruptCheckpointError) as exc:
                self._report(f"{POINTER} pointer is unreadable: {exc}")
            else:
                match = _DIR_RE.match(name)
                assert match is not None  # _read_pointer checked it
                seq = int(match.group(1))
                tried.add(seq)
                try:
                    ckpt = self.load(seq)
                    if digest is not None:
                        actual = hashlib.sha256((ckpt.path / MANIFEST).read_bytes()).hexdigest()
                        if actual != digest:
                            raise CorruptCheckpointError(
                                f"{name}: manifest does not match the checksum in {POINTER}"
                            )
                    return ckpt
                except CorruptCheckpointError as exc:
                    self._report(f"{POINTER} names a bad checkpoint: {exc}")
        for seq in sorted(present, reverse=True):
            if seq in tried:
                continue
            try:
                return self.load(seq)
            except CorruptCheckpointError as exc:
                self._report(str(exc))
        if self._problems:
            raise CorruptCheckpointError(
                f"no valid checkpoint in {self.root}: " + "; ".join(self._problems)
            )
        return None


# -- inspection and instantiation --------------------------------------------------------


def _describe_dir(ckpt_dir: Path) -> list[str]:
    lines = [f"checkpoint {ckpt_dir.name}"]
    match = _DIR_RE.match(ckpt_dir.name)
    try:
        _load_dir(ckpt_dir, expect_sequence=int(match.group(1)) if match else None)
        lines.append("  status: verified (manifest checksum and every array sha256 match)")
    except CorruptCheckpointError as exc:
        lines.append(f"  status: CORRUPT: {exc}")
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        lines.append(f"  manifest unreadable: {exc}")
        return lines

    def dumps(value: Any) -> str:
        return json.dumps(value, sort_keys=True)

    created = manifest.get("created")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))
        if isinstance(created, int | float)
        else repr(created)
    )
    lines += [
        f"  path: {ckpt_dir}",
        f"  sequence: {manifest.get('sequence')}",
        f"  created: {when}",
        f"  format: {manifest.get('format')} v{manifest.get('format_version')}, "
        f"written by streamfact {manifest.get('streamfact_version')}",
    ]
    operators = manifest.get("operators")
    total = 0
    if isinstance(operators, dict):
        lines.append(f"  operators ({len(operators)}):")
        for name, op in operators.items():
            if not isinstance(op, dict):
                lines.append(f"    {name}: <malformed entry>")
                continue
            lines.append(f"    {name}: {op.get('class')}")
            lines.append(f"      params: {dumps(op.get('params'))}")
            meta = {k: v for k, v in (op.get("meta") or {}).items() if k != "params"}
            lines.append(f"      meta: {dumps(meta)}")
            raw_arrays = op.get("arrays")
            arrays: dict[str, Any] = raw_arrays if isinstance(raw_arrays, dict) else {}
            op_bytes = sum(int(a.get("nbytes", 0)) for a in arrays.values() if isinstance(a, dict))
            total += op_bytes
            lines.append(f"      arrays ({len(arrays)}, {_human(op_bytes)}):")
            for arr_name, info in arrays.items():
                if not isinstance(info, dict):
                    lines.append(f"        {arr_name!r}: <malformed entry>")
                    continue
                raw_shape = info.get("shape")
                shape = str(tuple(raw_shape)) if isinstance(raw_shape, list) else repr(raw_shape)
                try:
                    dtype = str(np.dtype(info.get("dtype")))
                except (TypeError, ValueError):
                    dtype = repr(info.get("dtype"))
                lines.append(
                    f"        {arr_name!r}: {dtype} {shape} {_human(int(info.get('nbytes', 0)))}"
                    f" [{info.get('file')}, sha256 {str(info.get('sha256'))[:16]}…]"
                )
    for key in ("source_position", "sink_states", "counters", "extra"):
        lines.append(f"  {key}: {dumps(manifest.get(key))}")
    exact = f" ({total} B)" if total >= 1024 else ""
    lines.append(f"  total array bytes: {_human(total)}{exact}")
    return lines


def describe(path: str | os.PathLike[str]) -> str:
    """A human-readable account of a store root or of one checkpoint directory.

    For a store it lists every checkpoint with its verification status and the
    pointer, then details the checkpoint ``LATEST`` names (or the newest one):
    operator classes, parameters, meta, each array's dtype, shape and size,
    source positions, sink states, counters and extras.
    """
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"no such checkpoint or store: {target}")
    if (target / MANIFEST).is_file():
        return "\n".join(_describe_dir(target))
    if not target.is_dir():
        raise CorruptCheckpointError(f"{target} is neither a checkpoint nor a checkpoint store")
    store = CheckpointStore(target)
    seqs = store.sequences()
    if not seqs and not (target / POINTER).exists():
        raise CorruptCheckpointError(f"{target} is neither a checkpoint nor a checkpoint store")
    lines = [f"checkpoint store {target}"]
    try:
        pointed, _ = store._read_pointer()
        lines.append(f"  {POINTER} -> {pointed}")
    except FileNotFoundError:
        pointed = None
        lines.append(f"  {POINTER}: missing")
    except (OSError, CorruptCheckpointError) as exc:
        pointed = None
        lines.append(f"  {POINTER}: unreadable ({exc})")
    lines.append(f"  checkpoints ({len(seqs)}):")
    for seq in seqs:
        try:
            store.load(seq)
            status = "ok"
        except CorruptCheckpointError as exc:
            status = f"CORRUPT: {exc}"
        lines.append(f"    {_dir_name(seq)}: {status}")
    detail = pointed if pointed and (target / pointed).is_dir() else None
    if detail is None and seqs:
        detail = _dir_name(seqs[-1])
    if detail is not None:
        lines.append("")
        lines += _describe_dir(target / detail)
    return "\n".join(lines)


def instantiate(entry: OperatorEntry) -> Operator:
    """Rebuild the operator of ``entry`` via ``cls.from_state(entry.state)``.

    Only classes inside the ``streamfact`` package are imported, and only
    :class:`~streamfact.operators.base.Operator` subclasses are accepted, so a
    checkpoint can never name arbitrary code to run.
    """
    path = entry.class_path
    if not isinstance(path, str) or not _CLASS_RE.match(path):
        raise CorruptCheckpointError(f"operator class path {path!r} is malformed")
    module_name, _, class_name = path.rpartition(".")
    if module_name != "streamfact" and not module_name.startswith("streamfact."):
        raise CorruptCheckpointError(
            f"refusing to import {path!r}: checkpoints may only name operator classes "
            "inside the streamfact package"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CorruptCheckpointError(f"operator class {path!r}: cannot import its module") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Operator)):
        raise CorruptCheckpointError(f"{path!r} is not a streamfact Operator class")
    return cls.from_state(entry.state)
