"""`g3n-data check` on unusual sets: one with 0 samples (every input rejected) and one whose sample
JSON is malformed: a count or a clear problem naming the file and the sample, never a traceback."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from datahelpers import CHEAP, save  # noqa: E402

import g3n_shards as gs  # noqa: E402
from g3n_data.check import check_set  # noqa: E402
from g3n_data.cli import main  # noqa: E402
from g3n_data.columns import ColumnMapping  # noqa: E402
from g3n_data.config import make_config  # noqa: E402
from g3n_data.ingest import run_ingest  # noqa: E402
from g3n_data.runner import run_preprocess  # noqa: E402
from g3n_shards.manifest import canonical_json, sha256_hex  # noqa: E402
from g3n_shards.testing import write_volume_set  # noqa: E402


def test_a_cohort_whose_every_input_was_rejected_checks_as_empty(tmp_path, capsys):
    root = tmp_path / "ds"
    bad = root / "sub-corrupt" / "anat" / "sub-corrupt_T1w.nii.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    save(np.random.default_rng(0).random((32, 32)).astype(np.float32), root / "sub-flat" / "anat" / "sub-flat_T1w.nii.gz")
    wl = tmp_path / "wl"
    run_ingest("bids", root, wl, ColumnMapping(cohort="E"))
    out = tmp_path / "shards"
    s = run_preprocess(wl, out, make_config("demo", CHEAP), progress=False)
    assert s.samples == 0 and sum(s.rejects_by_step.values()) == 2

    ss = gs.ShardSet.open(out, kind="volumes")
    assert len(ss) == 0 and list(ss) == [] and list(ss.iter_split(0, 2, 1, 2)) == []
    rep = check_set(out, worklist=wl)
    assert rep["ok"] and rep["samples"] == 0 and rep["rejects"] == 2 and rep["inputs"] == 2, rep
    assert main(["check", str(out), "--worklist", str(wl)]) == 0
    text = capsys.readouterr().out
    assert "OK: 0 samples, 2 rejects" in text and "note: the set holds no samples: all 2 inputs were rejected" in text


def _malformed_json_set(tmp_path: Path) -> tuple[Path, str]:
    """A set whose first sample's JSON is cut short, with a manifest re-signed to match (as a buggy
    writer would leave it): only decoding the sample can tell."""
    out = tmp_path / "v"
    write_volume_set(out, n=3, max_shard_samples=None)
    shard = out / "volumes-000000.tar"
    key = gs.ShardSet.open(out).keys()[0]
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == f"{key}.json":
                data = data[: len(data) // 2]
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    raw = buf.getvalue()
    shard.write_bytes(raw)
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][0].update(bytes=len(raw), sha256=sha256_hex(raw))
    man["digest"] = "sha256:" + sha256_hex(canonical_json({k: v for k, v in man.items() if k not in ("digest", "created")}))
    (out / "manifest.json").write_text(json.dumps(man))
    return out, key


def test_malformed_sample_json_is_a_problem_naming_file_and_sample(tmp_path, capsys):
    out, key = _malformed_json_set(tmp_path)
    for volumes in (True, False):
        rep = check_set(out, read_volumes=volumes)
        assert not rep["ok"] and rep["samples"] == 3
        (problem,) = rep["problems"]
        assert f"volumes-000000.tar:{key}: malformed sample JSON" in problem
    assert main(["check", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAILED: 3 samples" in captured.out
    assert f"volumes-000000.tar:{key}: malformed sample JSON" in captured.err and "Traceback" not in captured.err
