"""The glibc mmap-threshold pin used by the daemon."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_pin_applies_on_glibc_and_yields_to_the_environment() -> None:
    # In a child process, so this one's allocator is left alone. mallopt
    # returns 1 when glibc accepted the value; with MALLOC_MMAP_THRESHOLD_
    # set the user's value stands and nothing is called.
    code = "from streamfact.service.allocator import pin_mmap_threshold as p; print(p())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = "True" if platform.libc_ver()[0] == "glibc" else "False"
    assert out.stdout.strip() == expected
    env_out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "PATH": ""},
    )
    assert env_out.stdout.strip() == "False"
