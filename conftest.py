"""Workspace-wide pytest setup: the ``slow`` marker and ``--runslow``, for every package.

Slow tests (e.g. DeepSpeed on CPU, whose first run JIT-compiles a communication op) are skipped
by default so that `uv run pytest` stays within CI's budget; `uv run pytest --runslow` runs them.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long test, skipped unless --runslow")
    config.addinivalue_line("markers", "deepspeed: exercises DeepSpeed on CPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
