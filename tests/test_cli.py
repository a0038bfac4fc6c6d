"""The ``streamfact`` command: help, inspect, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import streamfact as sf
from streamfact.checkpoint import CheckpointStore, OperatorEntry


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamfact.cli", *args], capture_output=True, text=True
    )


def test_help_lists_the_commands() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("inspect", "serve", "version"):
        assert command in out.stdout


def test_inspect_prints_the_manifest_with_sizes(tmp_path: Path) -> None:
    rm = sf.RunningMoments(4)
    rm.update(np.random.default_rng(0).standard_normal((10, 4)))
    store = CheckpointStore(tmp_path)
    store.save(
        operators={"0:RunningMoments": OperatorEntry.from_operator(rm)},
        source_position={"row": 10},
    )
    out = _cli("inspect", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for needle in ("RunningMoments", "m2", "mean", "row"):
        assert needle in out.stdout
    assert "128" in out.stdout or "128 B" in out.stdout  # the 4x4 float64 m2 array


def test_inspect_reports_a_bad_path_with_exit_code_2(tmp_path: Path) -> None:
    out = _cli("inspect", str(tmp_path / "nothing-here"))
    assert out.returncode == 2
    assert "streamfact inspect:" in out.stderr


def test_serve_rejects_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "serve.toml"
    bad.write_text("[http]\nprot = 1\n")
    out = _cli("serve", "--config", str(bad))
    assert out.returncode == 2
    assert "'http.prot'" in out.stderr
