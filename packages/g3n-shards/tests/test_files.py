"""Files on disk: atomic writes get the umask's mode (not mkstemp's 0600); a writer removes only the
staging folders of writers that are gone, never a live (concurrent) writer's."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import g3n_shards as gs
from g3n_shards.testing import make_meta, write_volume_set
from g3n_shards.writer import STAGING_PREFIX, atomic_path, remove_stale_staging, staging_name

SHAPE = (16, 20, 16)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_and_sets_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        gs.atomic_write_bytes(tmp_path / "a.json", b"{}")
        gs.atomic_write_text(tmp_path / "sub" / "b.txt", "x")  # parents created
        with atomic_path(tmp_path / "w.safetensors") as tmp, open(tmp, "wb") as f:  # a writer that needs a name
            f.write(b"weights")
        with atomic_path(tmp_path / "s.safetensors") as tmp:  # a writer that creates its file 0600 (safetensors)
            os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
        with atomic_path(tmp_path / "v.nii.gz", keep_suffix=True) as tmp:
            assert tmp.name.endswith(".tmp.nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"\x1f\x8b")
        write_volume_set(tmp_path / "set", n=2)
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [tmp_path / "a.json", tmp_path / "sub" / "b.txt", tmp_path / "w.safetensors", tmp_path / "s.safetensors",
             tmp_path / "v.nii.gz",
             *sorted((tmp_path / "set").iterdir())]
    assert {f.name: _mode(f) for f in files} == {f.name: want for f in files}
    assert _mode(tmp_path / "set") == 0o777 & ~umask
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".gitkeep"]  # no temporaries left


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "t.bin"
    gs.atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_bytes() == b"old"


def _staging(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX))


def test_staging_folder_of_a_killed_writer_is_removed_a_live_one_is_kept(tmp_path):
    out = tmp_path / "v"
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        import g3n_shards as gs
        from g3n_shards.testing import make_meta
        w = gs.ShardWriter({str(out)!r}, kind="volumes", producer=gs.Producer(package="t"))
        w.write("k", make_meta(0), {{"volume": np.ones({SHAPE}, np.float32)}})
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        (killed,) = _staging(out)
        assert killed.startswith(f"{STAGING_PREFIX}") and f"-{proc.pid}-" in killed  # host and pid in the name
        # while that writer lives, another writer (here, in this process) leaves its folder alone
        live = gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="t"))
        live.write("k", make_meta(0), {"volume": np.ones(SHAPE, np.float32)})
        assert killed in _staging(out) and live.staging.name in _staging(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # other host, and a name in no known format: no owner can be checked, so they stay
    other_host = out / f"{STAGING_PREFIX}elsewhere-1-{'0' * 32}"
    legacy = out / f"{STAGING_PREFIX}{'f' * 32}"
    other_host.mkdir()
    legacy.mkdir()
    # a second writer arrives: the killed writer's folder goes, the live one (same process) stays
    w3 = gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="t"))
    assert killed not in _staging(out)
    assert {live.staging.name, w3.staging.name, other_host.name, legacy.name} == set(_staging(out))
    # the live writer then finishes normally: its set is complete, the other writer's folder untouched
    live.close()
    assert [s.key for s in gs.ShardSet.open(out)] == ["k"]
    assert w3.staging.name in _staging(out) and live.staging.name not in _staging(out)
    w3.abort()


def test_remove_stale_staging_checks_the_pid(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    host_part = staging_name()[len(STAGING_PREFIX):].rsplit("-", 2)[0]
    gone = tmp_path / f"{STAGING_PREFIX}{host_part}-{done.pid}-{'a' * 32}"
    mine = tmp_path / f"{STAGING_PREFIX}{host_part}-{os.getpid()}-{'b' * 32}"
    gone.mkdir()
    mine.mkdir()
    t0 = time.monotonic()
    assert remove_stale_staging(tmp_path) == [gone]
    assert time.monotonic() - t0 < 5 and mine.is_dir() and not gone.exists()
