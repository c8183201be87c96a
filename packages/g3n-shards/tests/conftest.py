from __future__ import annotations

from pathlib import Path

import pytest

from g3n_shards.testing import write_volume_set


@pytest.fixture
def volumes_set(tmp_path: Path) -> Path:
    write_volume_set(tmp_path / "vols")
    return tmp_path / "vols"
