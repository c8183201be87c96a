"""Shared setup for g3n-dit tests: tiny shapes (64 tokens x 4 channels, hidden 64, 2 blocks), one
CPU thread, and the ``slow`` marker (skipped unless ``--runslow``; only the DeepSpeed tests:
test_deepspeed.py on one rank, test_zero.py with 2 ranks and ZeRO-0/1/2)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
# tests import the small helper module next to this file (unique name: dit_testutil)
sys.path.insert(0, str(HERE))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and the shared cores lose a lot to oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
