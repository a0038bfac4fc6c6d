"""Every operator in streamfact.operators runs every conformance check."""

from __future__ import annotations

import pytest

from streamfact.testing.conformance import CHECKS, discover_operators

OPERATORS = discover_operators()


def test_discovery_finds_operators() -> None:
    names = {cls.__name__ for cls in OPERATORS}
    assert "RunningMoments" in names


@pytest.mark.parametrize("check_name", sorted(CHECKS))
@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_conformance(cls: type, check_name: str) -> None:
    CHECKS[check_name](cls)
