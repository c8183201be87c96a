import subprocess
import sys
import textwrap

import pytest

import g3n_shards as gs

from g3n_shards.testing import write_volume_set as write_volumes
SHAPE = (16, 20, 16)


@pytest.fixture
def many(tmp_path):
    write_volumes(tmp_path / "v", n=23, max_shard_samples=2)  # 12 shards
    return gs.ShardSet.open(tmp_path / "v")


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 4)])
@pytest.mark.parametrize("epoch", [0, 5])
def test_every_sample_exactly_once(many, world, workers, epoch):
    seen = [s.key for r in range(world) for w in range(workers)
            for s in many.iter_split(r, world, w, workers, seed=7, epoch=epoch)]
    assert sorted(seen) == sorted(many.keys())


def test_shuffle_deterministic_and_epoch_dependent(many):
    a = [s.key for s in many.iter_split(1, 2, 1, 2, seed=3, epoch=1)]
    b = [s.key for s in many.iter_split(1, 2, 1, 2, seed=3, epoch=1)]
    c = [s.key for s in many.iter_split(1, 2, 1, 2, seed=3, epoch=2)]
    assert a == b and a != c
    assert [s.key for s in many.iter_split(shuffle=False)] == many.keys()


def test_too_few_shards_caught_at_start(many):
    with pytest.raises(gs.ShardError, match=r"12 shards for 4 ranks x 4 workers = 16 readers"):
        many.iter_split(0, 4, 0, 4).__next__()


def test_cursor_resumes_exactly(many):
    full = [s.key for s in many.iter_split(0, 2, 1, 2, seed=1, epoch=3)]
    it = many.iter_split(0, 2, 1, 2, seed=1, epoch=3)
    head = [next(it) for _ in range(3)]
    rest = [s.key for s in many.iter_split(0, 2, 1, 2, seed=1, epoch=3, cursor=head[-1].cursor)]
    assert [s.key for s in head] + rest == full
    with pytest.raises(gs.ShardError, match="cursor does not belong"):
        next(many.iter_split(1, 2, 1, 2, seed=1, epoch=3, cursor=head[-1].cursor))


def test_webdataset_pipeline(many):
    keys = [s.key for s in many.webdataset(shuffle=True, seed=0)]
    assert sorted(keys) == sorted(many.keys())


def test_works_where_torch_cannot_be_imported(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import g3n_shards as gs
        from g3n_shards.testing import write_volume_set as write_volumes
        write_volumes(__import__("pathlib").Path({str(tmp_path / 'nt')!r}), n=4)
        ss = gs.ShardSet.open({str(tmp_path / 'nt')!r})
        assert len([s for s in ss]) == 4 and len(list(ss.webdataset())) == 4
        ss.verify()
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
