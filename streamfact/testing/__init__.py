"""Test utilities: the shared operator conformance suite."""

from streamfact.testing.conformance import CHECKS, discover_operators, run_all_checks

__all__ = ["CHECKS", "discover_operators", "run_all_checks"]
