"""What the daemon tests share: planted events, TOML configs, the serve process.

Importable from any test as ``daemon_helpers`` (tests/ is put on sys.path by
tests/conftest.py), next to the ``kafka_broker`` fixture module.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from streamfact.checkpoint import CheckpointStore, instantiate
from streamfact.operators.keyed_svd import KeyedSVD


def planted_events(n: int, seed: int, n_users: int, n_items: int) -> pa.Table:
    """Interaction events from a planted rank-3 structure: user u likes item group u % 3."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = (users % 3) * (n_items // 3) + rng.integers(0, n_items // 3, n)
    return pa.table(
        {
            "user": pa.array([f"u{u}" for u in users]),
            "item": pa.array([f"i{i}" for i in items]),
            "weight": pa.array(rng.uniform(0.5, 1.5, n)),
        }
    )


def replayable_model(rank: int) -> dict[str, Any]:
    """The [model] section of the crash tests: they compare with an
    uninterrupted run, so the model may depend only on the events — exact
    updates and no refinements on a timer."""
    return {"rank": rank, "method": "zha-simon", "refine_every_seconds": 0}


def write_config(tmp: Path, sections: dict[str, dict[str, Any]], **over: Any) -> Path:
    """Write ``tmp/serve.toml``; ``section__key=value`` overrides one key."""
    merged = {sec: dict(body) for sec, body in sections.items()}
    for dotted, value in over.items():
        sec, key = dotted.split("__")
        merged.setdefault(sec, {})[key] = value
    text = "".join(
        f"[{sec}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items())
        for sec, body in merged.items()
    )
    path = tmp / "serve.toml"
    path.write_text(text)
    return path


def serve(config: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``streamfact serve`` and wait until it listens; returns (process, base URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamfact.cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on" in line, proc.stderr.read() if proc.stderr else line
    return proc, line.strip().rsplit(" ", 1)[-1]


def kill_repeatedly(config: Path, checkpoints: Path, delays: list[float]) -> None:
    """Start ``streamfact serve`` once per delay and SIGKILL it after that many
    seconds. The first delay should be 0: that kill must land before any
    checkpoint exists, which is asserted."""
    for attempt, delay in enumerate(delays):
        proc, _ = serve(config)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
        if attempt == 0:
            assert not CheckpointStore(checkpoints).sequences()


def final_model(tmp: Path) -> KeyedSVD:
    """The KeyedSVD in the latest checkpoint under ``tmp/ckpt``."""
    ckpt = CheckpointStore(tmp / "ckpt").load_latest()
    assert ckpt is not None
    (entry,) = ckpt.operators.values()
    model = instantiate(entry)
    assert isinstance(model, KeyedSVD)
    return model
