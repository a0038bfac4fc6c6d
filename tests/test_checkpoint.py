"""Tests of the atomic, checksummed checkpoint store."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamfact.checkpoint import (
    SAVE_STEPS,
    Checkpoint,
    CheckpointStore,
    CheckpointWarning,
    CorruptCheckpointError,
    OperatorEntry,
    describe,
    instantiate,
)
from streamfact.operators.base import OperatorState
from streamfact.operators.moments import RunningMoments

MOMENTS = "streamfact.operators.moments.RunningMoments"
# Names that would be unsafe or ambiguous as file names.
ODD_NAMES = ["../escape", "a/b", "C:\\x", "line\nbreak", "ü-名前", ".", ""]


def sample_states(seed: int) -> dict[str, OperatorEntry]:
    rng = np.random.default_rng(seed)
    special = rng.standard_normal(6)
    special[:3] = [np.nan, -0.0, np.inf]
    first = OperatorState(
        arrays={
            "f32": rng.standard_normal((4, 3)).astype(np.float32),
            "f64": special,
            "i64": rng.integers(-(2**62), 2**62, size=7, dtype=np.int64),
            "labels": np.array(["alpha", "β", "", "gamma-long-key"]),
            "empty": np.zeros((0, 3)),
            "scalar": np.array(seed + 0.25),
            "fortran": np.asfortranarray(rng.standard_normal((3, 5))),
            "mask": rng.random(5) > 0.5,
            "bytes": np.array([b"ab", b"\x00\xff"]),
        },
        meta={"class": "X", "params": {"k": 3, "dtype": "float64"}, "count": seed, "nested": [1]},
    )
    second = OperatorState(
        arrays={name: np.arange(i + 1, dtype=np.int32) for i, name in enumerate(ODD_NAMES)},
        meta={"params": None},
    )
    return {
        "first": OperatorEntry("streamfact.operators.fake.First", first),
        "second/odd name": OperatorEntry("streamfact.operators.fake.Second", second),
        "no arrays": OperatorEntry("streamfact.operators.fake.Third", OperatorState({}, {})),
    }


def assert_states_identical(got: dict[str, OperatorEntry], want: dict[str, OperatorEntry]) -> None:
    assert list(got) == list(want)
    for name, entry in want.items():
        g = got[name]
        assert g.class_path == entry.class_path
        assert g.state.meta == entry.state.meta
        assert list(g.state.arrays) == list(entry.state.arrays)
        for arr_name, arr in entry.state.arrays.items():
            back = g.state.arrays[arr_name]
            assert back.dtype == arr.dtype, (name, arr_name)
            assert back.shape == arr.shape, (name, arr_name)
            # Bitwise: NaN payloads and -0.0 must survive too.
            assert back.tobytes(order="A") == arr.tobytes(order="A"), (name, arr_name)
            assert back.flags.f_contiguous == arr.flags.f_contiguous


def save_sample(store: CheckpointStore, seed: int) -> Checkpoint:
    return store.save(
        operators=sample_states(seed),
        source_position={"file": f"part-{seed}.parquet", "row_group": seed, "row": 17},
        sink_states={"parquet": {"files": [f"out-{seed}"], "next": seed + 1}},
        counters={"rows_in": 100 * seed, "rate": 1.5},
        extra={"note": "ß", "seed": seed},
    )


def assert_is_sample(ckpt: Checkpoint | None, seed: int) -> None:
    assert ckpt is not None
    assert_states_identical(ckpt.operators, sample_states(seed))
    assert ckpt.source_position == {"file": f"part-{seed}.parquet", "row_group": seed, "row": 17}
    assert ckpt.sink_states == {"parquet": {"files": [f"out-{seed}"], "next": seed + 1}}
    assert ckpt.counters == {"rows_in": 100 * seed, "rate": 1.5}
    assert ckpt.extra == {"note": "ß", "seed": seed}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_manifest(ckpt_dir: Path, edit: Any) -> None:
    """Edit a manifest and re-seal it with a valid checksum (as an attacker could)."""
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    manifest.pop("manifest_sha256")
    edit(manifest)
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    manifest["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# -- round trip ------------------------------------------------------------------


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "ckpt")
    assert store.load_latest() is None
    assert store.sequences() == []
    saved = save_sample(store, 1)
    assert saved.sequence == 1
    assert saved.path == tmp_path / "ckpt" / "ckpt-0000000001"
    assert_is_sample(saved, 1)

    loaded = CheckpointStore(tmp_path / "ckpt").load_latest()
    assert_is_sample(loaded, 1)
    assert loaded is not None and loaded.sequence == 1 and loaded.created == saved.created
    assert_is_sample(store.load(1), 1)

    # Array files are named by index; the real (unsafe) names live in the manifest.
    files = {p.name for p in saved.path.iterdir()} - {"manifest.json"}
    assert all(f.startswith("op") and f.endswith(".npy") for f in files)
    assert len(files) == sum(len(e.state.arrays) for e in sample_states(1).values())
    manifest = json.loads((saved.path / "manifest.json").read_text())
    assert manifest["format"] == "streamfact-checkpoint" and manifest["format_version"] == 1
    assert manifest["sequence"] == 1 and manifest["streamfact_version"]
    first = manifest["operators"]["first"]
    assert first["class"] == "streamfact.operators.fake.First"
    assert first["params"] == {"k": 3, "dtype": "float64"}
    assert first["arrays"]["f32"]["shape"] == [4, 3] and first["arrays"]["f32"]["nbytes"] == 48
    assert set(manifest["operators"]["second/odd name"]["arrays"]) == set(ODD_NAMES)
    assert (tmp_path / "ckpt" / "LATEST").read_text().startswith("ckpt-0000000001\n")
    assert hidden_entries(tmp_path / "ckpt") == []


def test_loaded_arrays_are_writable_and_independent(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 2)
    ckpt = store.load(1)
    arr = ckpt.operators["first"].state.arrays["f32"]
    arr[0, 0] = 42.0  # operators update their state in place after a restore
    assert store.load(1).operators["first"].state.arrays["f32"][0, 0] != 42.0


def test_keep_prunes_old_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for seed in range(1, 6):
        assert store.next_sequence() == seed
        assert save_sample(store, seed).sequence == seed
    assert store.sequences() == [4, 5]
    assert_is_sample(store.load_latest(), 5)
    assert_is_sample(store.load(4), 4)
    with pytest.raises(CorruptCheckpointError, match="does not exist"):
        store.load(3)
    assert hidden_entries(tmp_path) == []


def test_keep_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


def test_sequences_ignore_foreign_entries(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    (tmp_path / "ckpt-12").mkdir()
    (tmp_path / "ckpt-0000000009").write_text("a file, not a directory")
    (tmp_path / ".tmp-ckpt-7-1").mkdir()
    (tmp_path / "notes").mkdir()
    assert store.sequences() == [1]
    assert save_sample(store, 2).sequence == 2


# -- corruption is detected and the previous checkpoint used --------------------------


@pytest.mark.parametrize("where", ["data", "header", "truncated"])
def test_corrupt_array_file_falls_back(tmp_path: Path, where: str) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    second = save_sample(store, 2)
    manifest = json.loads((second.path / "manifest.json").read_text())
    target = second.path / manifest["operators"]["first"]["arrays"]["f64"]["file"]
    if where == "data":
        flip_byte(target, -1)
    elif where == "header":
        flip_byte(target, 20)
    else:
        target.write_bytes(target.read_bytes()[:-5])
    with pytest.raises(CorruptCheckpointError, match="sha256 mismatch"):
        store.load(2)
    with pytest.warns(CheckpointWarning, match="ckpt-0000000002"):
        ckpt = store.load_latest()
    assert ckpt is not None and ckpt.sequence == 1
    assert_is_sample(ckpt, 1)
    assert len(store.problems) == 1 and "sha256 mismatch" in store.problems[0]


def test_truncated_manifest_falls_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    second = save_sample(store, 2)
    manifest = second.path / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        store.load(2)
    with pytest.warns(CheckpointWarning):
        assert_is_sample(store.load_latest(), 1)
    assert any("not valid JSON" in p for p in store.problems)


def test_missing_array_file_falls_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    second = save_sample(store, 2)
    (second.path / "op0-arr3.npy").unlink()
    with pytest.raises(CorruptCheckpointError, match=r"op0-arr3\.npy is missing"):
        store.load(2)
    with pytest.warns(CheckpointWarning):
        assert_is_sample(store.load_latest(), 1)


def test_altered_but_valid_manifest_is_detected(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    second = save_sample(store, 2)
    path = second.path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["source_position"]["row"] = 18  # still valid JSON, wrong position
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpointError, match="manifest checksum mismatch"):
        store.load(2)
    with pytest.warns(CheckpointWarning):
        assert_is_sample(store.load_latest(), 1)


def test_resealed_manifest_is_caught_by_latest_checksum(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    second = save_sample(store, 2)
    rewrite_manifest(second.path, lambda m: m["counters"].update(rows_in=0))
    assert store.load(2).counters["rows_in"] == 0  # self-consistent on its own ...
    with pytest.warns(CheckpointWarning, match="checksum in LATEST"):
        ckpt = store.load_latest()  # ... but not the manifest LATEST committed to
    # Rejected as LATEST's target, it is not retried by the fallback scan.
    assert ckpt is not None and ckpt.sequence == 1


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\xff\xfe garbage", b"../../etc\n", b"ckpt-0000000002\nmanifest-sha256 zz\n"],
    ids=["empty", "binary", "traversal", "bad-checksum-line"],
)
def test_garbage_pointer_falls_back_to_newest_valid(tmp_path: Path, content: bytes) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    save_sample(store, 2)
    (tmp_path / "LATEST").write_bytes(content)
    with pytest.warns(CheckpointWarning, match="LATEST"):
        assert_is_sample(store.load_latest(), 2)
    assert len(store.problems) == 1 and "LATEST" in store.problems[0]


def test_pointer_to_missing_dir_falls_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    save_sample(store, 2)
    (tmp_path / "LATEST").write_text("ckpt-0000000009\n")
    with pytest.warns(CheckpointWarning, match="does not exist"):
        assert_is_sample(store.load_latest(), 2)
    # A later save must not reuse the sequence number the pointer named.
    assert save_sample(store, 3).sequence == 10


def test_missing_pointer_falls_back(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    (tmp_path / "LATEST").unlink()
    with pytest.warns(CheckpointWarning, match="missing"):
        assert_is_sample(store.load_latest(), 1)


def test_fresh_store_is_silent(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "never-created")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.load_latest() is None
    assert store.problems == []
    assert not (tmp_path / "never-created").exists()


def test_no_valid_checkpoint_raises_instead_of_restarting(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = save_sample(store, 1)
    flip_byte(ckpt.path / "op0-arr0.npy", -1)
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError, match="no valid"):
        store.load_latest()
    assert len(store.problems) == 1


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = save_sample(store, 1)
    rewrite_manifest(ckpt.path, lambda m: m.update(format_version=2))
    with pytest.raises(CorruptCheckpointError, match="format_version 2"):
        store.load(1)


def test_manifest_shape_or_dtype_disagreeing_with_file_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    ckpt = save_sample(store, 1)

    def reshape(m: dict[str, Any]) -> None:
        m["operators"]["first"]["arrays"]["f32"]["shape"] = [3, 4]

    rewrite_manifest(ckpt.path, reshape)
    with pytest.raises(CorruptCheckpointError, match="manifest says"):
        store.load(1)


# -- no pickle, no foreign code ----------------------------------------------------------


class Payload:
    """Unpickling this would create a directory: a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("variant", ["honest-object-dtype", "lying-manifest", "raw-pickle"])
def test_pickled_array_is_refused_without_running_it(tmp_path: Path, variant: str) -> None:
    store = CheckpointStore(tmp_path / "store")
    state = OperatorState({"x": np.zeros(1)}, {})
    ckpt = store.save(operators={"op": OperatorEntry(MOMENTS, state)}, source_position={})
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    target = ckpt.path / "op0-arr0.npy"
    if variant == "raw-pickle":
        target.write_bytes(pickle.dumps(evil))
    else:
        with open(target, "wb") as f:
            np.save(f, evil, allow_pickle=True)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()

    def reseal(m: dict[str, Any]) -> None:
        info = m["operators"]["op"]["arrays"]["x"]
        info["sha256"] = digest
        if variant == "honest-object-dtype":
            info["dtype"] = "|O"

    rewrite_manifest(ckpt.path, reseal)
    with pytest.raises(CorruptCheckpointError):
        store.load(1)
    with pytest.warns(CheckpointWarning), pytest.raises(CorruptCheckpointError):
        store.load_latest()
    describe(tmp_path / "store")
    assert not marker.exists()
    if variant != "raw-pickle":
        # Control: the payload is live, so the assertion above could have failed.
        np.load(target, allow_pickle=True)
        assert marker.exists()


@pytest.mark.parametrize(
    "bad",
    [
        np.array([object()], dtype=object),
        np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]),
        [1.0, 2.0],
    ],
    ids=["object", "structured", "list"],
)
def test_save_refuses_unstorable_arrays_before_writing(tmp_path: Path, bad: Any) -> None:
    store = CheckpointStore(tmp_path / "s")
    state = OperatorState({"ok": np.ones(2), "bad": bad}, {})
    with pytest.raises(ValueError, match="'bad'"):
        store.save(operators={"op": OperatorEntry(MOMENTS, state)}, source_position={})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source_position": {"offset": float("nan")}},
        {"source_position": {"offset": np.int64(3)}},
        {"source_position": {}, "counters": {"bad": {1, 2}}},
    ],
    ids=["nan", "numpy-int", "set"],
)
def test_save_refuses_non_json_fields(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        store.save(operators={}, **kwargs)
    assert store.sequences() == []


# -- crash safety: a failure after every step of save ---------------------------------------


class Crash(RuntimeError):
    pass


POINTER_COMMITTED = SAVE_STEPS.index("pointer_written")
RENAMED = SAVE_STEPS.index("renamed")


def test_save_steps_are_reported_in_order(tmp_path: Path) -> None:
    seen: list[str] = []
    store = CheckpointStore(tmp_path, fault_hook=seen.append)
    save_sample(store, 1)
    assert tuple(seen) == SAVE_STEPS


@pytest.mark.parametrize("with_previous", [True, False], ids=["previous", "first"])
@pytest.mark.parametrize("step", SAVE_STEPS)
def test_crash_at_every_step_leaves_a_readable_store(
    tmp_path: Path, step: str, with_previous: bool
) -> None:
    def hook(name: str) -> None:
        if name == step:
            raise Crash(name)

    if with_previous:
        save_sample(CheckpointStore(tmp_path, keep=1), 1)
    crashing = CheckpointStore(tmp_path, keep=1, fault_hook=hook)
    with pytest.raises(Crash):
        save_sample(crashing, 2)

    # The pointer is the commit point: before it is replaced readers see the
    # previous checkpoint (or, on a first save, whatever complete dir exists).
    index = SAVE_STEPS.index(step)
    store = CheckpointStore(tmp_path, keep=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = store.load_latest()
    if index >= POINTER_COMMITTED:
        assert ckpt is not None and ckpt.sequence == (2 if with_previous else 1)
        assert_is_sample(ckpt, 2)
        assert caught == []
    elif with_previous:
        assert ckpt is not None and ckpt.sequence == 1
        assert_is_sample(ckpt, 1)
        assert caught == []
    elif index >= RENAMED:
        # First ever save renamed its directory but never wrote LATEST.
        assert ckpt is not None and ckpt.sequence == 1
        assert_is_sample(ckpt, 2)
        assert any("LATEST pointer is missing" in str(w.message) for w in caught)
    else:
        assert ckpt is None and caught == []

    # Recovery: the next save works, becomes the latest and cleans up leftovers.
    after = save_sample(store, 3)
    assert after.sequence == max(store.sequences())
    assert_is_sample(store.load_latest(), 3)
    assert store.problems == []
    assert store.sequences() == [after.sequence]  # keep=1
    assert hidden_entries(tmp_path) == []


def test_hard_exit_mid_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    """A process that dies without unwinding (like SIGKILL) during the write."""
    store = CheckpointStore(tmp_path)
    save_sample(store, 1)
    script = (
        "import os, sys, numpy as np\n"
        "from streamfact.checkpoint import CheckpointStore, OperatorEntry\n"
        "from streamfact.operators.base import OperatorState\n"
        "def hook(step):\n"
        "    if step == 'manifest_written': os._exit(9)\n"
        "store = CheckpointStore(sys.argv[1], fault_hook=hook)\n"
        "state = OperatorState({'x': np.ones(10**5)}, {})\n"
        "store.save(operators={'op': OperatorEntry('streamfact.a.B', state)},\n"
        "           source_position={'row': 1})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert proc.returncode == 9
    assert any(name.startswith(".tmp-ckpt-2-") for name in hidden_entries(tmp_path))
    assert_is_sample(CheckpointStore(tmp_path).load_latest(), 1)
    assert save_sample(store, 2).sequence == 2
    assert hidden_entries(tmp_path) == []


def test_tmp_dir_of_a_live_writer_is_not_removed(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".tmp-ckpt-5-{child.pid}"
        live.mkdir()
        save_sample(CheckpointStore(tmp_path), 1)
        assert live.exists()
    finally:
        child.kill()
        child.wait()
    save_sample(CheckpointStore(tmp_path), 2)
    assert not live.exists()


# -- describe and instantiate ------------------------------------------------------------------


def moments_checkpoint(root: Path) -> tuple[CheckpointStore, RunningMoments]:
    rm = RunningMoments(3)
    rm.update(np.random.default_rng(0).standard_normal((50, 3)))
    store = CheckpointStore(root)
    store.save(
        operators={"moments": OperatorEntry.from_operator(rm)},
        source_position={"file": "a.parquet", "row": 50},
        counters={"rows_in": 50},
    )
    return store, rm


def test_describe_store_and_checkpoint(tmp_path: Path) -> None:
    moments_checkpoint(tmp_path)
    text = describe(tmp_path)
    assert "LATEST -> ckpt-0000000001" in text
    assert "ckpt-0000000001: ok" in text
    assert MOMENTS in text
    assert '"dim": 3' in text and '"dtype": "float64"' in text
    assert "'mean': float64 (3,) 24 B" in text
    assert "'m2': float64 (3, 3) 72 B" in text
    assert '"row": 50' in text and '"rows_in": 50' in text
    assert "total array bytes: 96 B" in text
    assert describe(tmp_path / "ckpt-0000000001") in text

    flip_byte(tmp_path / "ckpt-0000000001" / "op0-arr1.npy", -1)
    corrupt = describe(tmp_path)
    assert "CORRUPT" in corrupt and "sha256 mismatch" in corrupt
    assert "'m2': float64 (3, 3) 72 B" in corrupt  # the manifest is still shown

    with pytest.raises(FileNotFoundError):
        describe(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptCheckpointError, match="neither"):
        describe(tmp_path / "empty")


def test_instantiate_round_trips_a_real_operator(tmp_path: Path) -> None:
    _, rm = moments_checkpoint(tmp_path)
    ckpt = CheckpointStore(tmp_path).load_latest()
    assert ckpt is not None
    assert ckpt.operators["moments"].class_path == MOMENTS
    restored = instantiate(ckpt.operators["moments"])
    assert isinstance(restored, RunningMoments)
    assert restored.count == rm.count
    assert restored.mean_.tobytes() == rm.mean_.tobytes()
    assert restored.m2_.tobytes() == rm.m2_.tobytes()
    more = np.random.default_rng(1).standard_normal((20, 3))
    rm.update(more)
    restored.update(more)
    assert restored.m2_.tobytes() == rm.m2_.tobytes()


@pytest.mark.parametrize(
    "class_path",
    [
        "os.system",
        "subprocess.Popen",
        "this.s",
        "streamfactx.evil.Thing",
        "streamfact",
        "streamfact.checkpoint.os",
        "streamfact.checkpoint.CheckpointStore",
        "streamfact.no_such_module.Thing",
        "streamfact.operators.moments.RunningMoments; import os",
    ],
)
def test_instantiate_refuses_foreign_classes(class_path: str) -> None:
    already_loaded = "this" in sys.modules
    entry = OperatorEntry(class_path, RunningMoments(2).state())
    with pytest.raises(CorruptCheckpointError):
        instantiate(entry)
    assert ("this" in sys.modules) == already_loaded
