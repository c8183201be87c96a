"""Shared setup for g3n-dit tests: tiny shapes (64 tokens x 4 channels, hidden 64, 2 blocks), one
CPU thread, and the ``slow`` marker (skipped unless ``--runslow``; only the DeepSpeed test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
# tests import the small helper module next to this file (unique name: dit_testutil)
sys.path.insert(0, str(HERE))


def pytest_addoption(parser):
    try:
        parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    except ValueError:  # another package's conftest already added it
        pass


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test, skipped unless --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow", default=False):
        return
    skip = pytest.mark.skip(reason="slow: use --runslow")
    for item in items:
        if "slow" in item.keywords and HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and the shared cores lose a lot to oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
