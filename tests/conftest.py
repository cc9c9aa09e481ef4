"""Opt-in markers: hardware- or time-hungry tests run only when asked for.

`macos` tests exercise Core ML itself and need a Mac (`--run-macos`); `slow` tests use
full-size architectures (`--run-slow`). Both are reported as skipped with the flag
that enables them, never silently dropped.
"""

from __future__ import annotations

import sys

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-macos", action="store_true", help="run tests that need macOS and Core ML")
    parser.addoption("--run-slow", action="store_true", help="run full-size / long tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--run-macos") and sys.platform != "darwin":
        raise pytest.UsageError("--run-macos needs macOS: Core ML prediction does not exist elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gates = {"macos": "--run-macos", "slow": "--run-slow"}
    for item in items:
        for marker, flag in gates.items():
            if marker in item.keywords and not config.getoption(flag):
                item.add_marker(pytest.mark.skip(reason=f"{marker}: enable with {flag}"))
