"""Test setup for g3n-mae: one CPU thread and shared fixtures (markers: the root conftest.py).

``slow`` tests are skipped unless ``--runslow`` is given. The one-process ``deepspeed`` test
(test_deepspeed.py) runs by default (it takes ~15-25 s once DeepSpeed's communication op is in the
torch extensions cache; its very first run on a machine JIT-compiles that op, ~90 s); deselect it
with ``-m "not deepspeed"``. The 2-process ZeRO-0/1/2/3 test (test_zero.py) is ``slow`` too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_volumes() -> dict[str, np.ndarray]:
    from g3n_mae.data import brain_like_volumes

    return brain_like_volumes(16, (32, 32, 32), seed=3)


@pytest.fixture(scope="session")
def volume_set(tmp_path_factory, small_volumes):
    """A 'volumes' shard set of 16 brain-like 32^3 volumes, 4 per shard."""
    import g3n_shards as gs

    out = tmp_path_factory.mktemp("vols") / "set"
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-mae-tests"),
                        geometry=gs.Geometry(shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8)),
                        max_shard_samples=4) as w:
        for i, (key, vol) in enumerate(sorted(small_volumes.items())):
            meta = gs.SampleMeta(subject=f"sub-{i:02d}", session="ses-1", cohort="SYN", site=f"s{i % 2}",
                                 modality="T1", age=30.0 + i, sex="F" if i % 2 else "M", diagnosis="HC")
            w.write(gs.sample_key(meta), meta, {"volume": vol})
    return out
