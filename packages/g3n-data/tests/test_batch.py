"""Batch preprocessing: planted bad inputs end in rejects, kill + resume gives identical shards,
job-array parts merge into the same samples, every input is a sample or a reject."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: make the helpers importable
from datahelpers import (  # noqa: E402
    CHEAP, FAST, TCGA, TCGA_FILES, TCGA_SRI, TCGA_SRI_FILES, ixi_paths, link, save, save_broken_affine,
)

import g3n_shards as gs  # noqa: E402
from g3n_data import check, ingest, preprocess  # noqa: E402
from g3n_data.atlas import load_atlas  # noqa: E402
from g3n_data.columns import ColumnMapping  # noqa: E402
from g3n_data.config import make_config  # noqa: E402
from g3n_data.ingest import run_ingest  # noqa: E402
from g3n_data.pipeline import process_subject  # noqa: E402
from g3n_data.runner import merge_parts, run_preprocess  # noqa: E402
from g3n_data.worklist import WorkItem  # noqa: E402


def _bad_bids(root: Path) -> Path:
    rng = np.random.default_rng(0)
    t = root / "sub-tcga" / "ses-1" / "anat"
    link(TCGA / TCGA_FILES["T1"], t / "sub-tcga_ses-1_T1w.nii.gz")
    link(TCGA / TCGA_FILES["T1c"], t / "sub-tcga_ses-1_ce-gd_T1w.nii.gz")
    # a "T2" of pure noise in that session: the rigid step to the T1 finds nothing to match
    save((rng.random((64, 64, 20)) * 100).astype(np.float32), t / "sub-tcga_ses-1_T2w.nii.gz",
         np.diag([3.5, 3.5, 6.0, 1.0]))
    a = lambda n: root / f"sub-{n}" / "anat" / f"sub-{n}_T1w.nii.gz"  # noqa: E731
    a("corrupt").parent.mkdir(parents=True)
    a("corrupt").write_bytes(b"\x1f\x8b\x08\x00garbage")
    save(rng.random((64, 64)).astype(np.float32), a("flat"))
    save(rng.random((24, 24, 24, 4)).astype(np.float32), a("series"))
    vol = rng.random((24, 24, 24)).astype(np.float32)
    vol[3, 4, 5] = np.nan
    save(vol, a("nan"))
    save(np.zeros((24, 24, 24), np.float32), a("empty"))
    save_broken_affine(a("affine"))
    # noise where a head should be: registration runs but cannot match the atlas
    save((rng.random((60, 60, 45)) * 100).astype(np.float32), a("noise"), np.diag([4.0, 4.0, 4.0, 1.0]))
    # a FLAIR without a T1 in its session
    link(TCGA / TCGA_FILES["FLAIR"], root / "sub-orphan" / "ses-2" / "anat" / "sub-orphan_ses-2_FLAIR.nii.gz")
    # metadata failing validation
    link(ixi_paths()[1], a("badmeta"))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-tcga\t51\tF\nsub-badmeta\t250\tM\n")
    return root


def test_bad_inputs_end_in_rejects_and_nothing_is_lost(tmp_path):
    root = _bad_bids(tmp_path / "ds")
    wl = tmp_path / "wl"
    run_ingest("bids", root, wl, ColumnMapping(cohort="T"))
    cfg = make_config("demo", FAST)
    out = tmp_path / "shards"
    s = run_preprocess(wl, out, cfg, workers=1, qc_montage=True, progress=False)
    rejects = {Path(r["path"]).name.split("_")[0]: r for r in gs.RejectLog(out).records()}
    expect = {
        "sub-corrupt": ("load", "unreadable or corrupt file"),
        "sub-flat": ("load", "not a 3D volume"),
        "sub-series": ("load", "not a 3D volume"),
        "sub-nan": ("load", "NaN or Inf voxels"),
        "sub-empty": ("load", "empty image"),
        "sub-affine": ("load", "broken affine"),
        "sub-noise": ("qc", "registration similarity to the atlas under threshold"),
        "sub-orphan": ("anchor", "no T1 in its session"),
    }
    for sub, (step, reason) in expect.items():
        assert (rejects[sub]["step"], rejects[sub]["reason"]) == (step, reason), rejects[sub]
        assert rejects[sub]["subject"] == sub
    assert rejects["sub-badmeta"]["step"] == "metadata" and "250" in rejects["sub-badmeta"]["reason"]
    assert "atlas_correlation" in rejects["sub-noise"]  # the figures travel with the reject
    t2 = rejects["sub-tcga"]
    assert (t2["step"], t2["reason"], t2["modality"]) == ("qc", "rigid registration to the session T1 under threshold", "T2")
    assert t2["mutual_information"] < 0.1
    assert len(rejects) == 10 and sum(s.rejects_by_step.values()) == 10

    ss = gs.ShardSet.open(out, kind="volumes")
    assert sorted(ss.keys()) == ["t-sub-tcga-ses-1-t1", "t-sub-tcga-ses-1-t1c"]
    g = ss.manifest.geometry
    assert g.shape == (80, 96, 80) and g.spacing == (2.0, 2.0, 2.0) and g.token_grid == (10, 12, 10)
    assert g.space == "SRI24" and np.allclose(np.array(g.affine), load_atlas(cfg.atlas, cfg.geometry).affine)
    assert ss.manifest.extra["preprocess"]["threads_per_process"] == 1
    atlas = load_atlas(cfg.atlas, cfg.geometry)
    for smp in ss:
        v = smp.arrays["volume"]
        assert v.min() >= 0 and np.isfinite(v).all()
        inside = v[atlas.mask_on_grid].sum() / v.sum()
        assert inside > 0.9  # the brain is in the field of view, on the atlas brain (mask dilated 2 mm)
        assert (out / "qc" / f"{smp.key}.png").is_file()
    meta = ss.metadata()["t-sub-tcga-ses-1-t1c"]
    assert (meta.age, meta.sex, meta.cohort, meta.modality) == (51.0, "F", "T", "T1c")
    dumped = json.dumps({k: m.model_dump(mode="json") for k, m in ss.metadata().items()})
    assert "TE=12" not in dumped and "Time=" not in dumped  # TCGA header description not copied
    rep = check.check_set(out, worklist=wl)
    assert rep["ok"], rep["problems"]
    assert rep["inputs"] == 2 + 10


def test_implausible_brain_mask_volume_is_rejected(tmp_path):
    """A skull-stripped input whose brain is a 40 mm cube: the mask volume test sends it to rejects."""
    vol = np.zeros((100, 100, 100), np.float32)
    vol[30:70, 30:70, 30:70] = 100.0
    p = save(vol, tmp_path / "cube.nii.gz")
    cfg = make_config("demo", {"skullstrip": {"method": "none"}, "n4": {"enabled": False},
                               "registration": {"enabled": False}})
    item = WorkItem(path=str(p), key="c-s1-t1", meta={"subject": "s1", "modality": "T1", "cohort": "c"})
    res = process_subject([item], cfg, load_atlas(cfg.atlas, cfg.geometry))
    assert not res.samples
    (r,) = res.rejects
    assert (r["step"], r["reason"], r["brain_ml"]) == ("qc", "implausible brain mask volume", 64.0)


def _cheap_worklist(tmp_path: Path, n: int = 5) -> Path:
    """n subjects of already-registered, skull-stripped T1 + T2 (the TCGA SRI24 files, linked)."""
    root = tmp_path / "ds"
    for i in range(n):
        for mod, suf in (("T1", "T1w"), ("T2", "T2w")):
            link(TCGA_SRI / TCGA_SRI_FILES[mod], root / f"sub-{i:02d}" / "anat" / f"sub-{i:02d}_{suf}.nii.gz")
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-{i:02d}\t{20 + i}\n" for i in range(n)))
    wl = tmp_path / "wl"
    run_ingest("bids", root, wl, ColumnMapping(cohort="R"))
    return wl


def _set_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _finished(cache: Path) -> list[Path]:
    """Subjects the cache holds as finished: a staging folder (``.stage-*``) may already hold its
    result.json when the kill comes, but it is not renamed into place, so a resume does not reuse it."""
    return [p for p in cache.glob("*/result.json") if not p.parent.name.startswith(".")]


def test_killed_and_resumed_run_gives_identical_shards(tmp_path):
    wl = _cheap_worklist(tmp_path)
    cfg = make_config("demo", CHEAP)
    ref = tmp_path / "ref"
    run_preprocess(wl, ref, cfg, progress=False)

    out = tmp_path / "resumed"
    script = textwrap.dedent(f"""
        from g3n_data.config import PreprocessConfig
        from g3n_data.runner import run_preprocess
        cfg = PreprocessConfig.model_validate_json({cfg.model_dump_json()!r})
        run_preprocess({str(wl)!r}, {str(out)!r}, cfg, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    cache = out / ".g3n-cache"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        done = _finished(cache) if cache.is_dir() else []
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # a killed run leaves no set a reader accepts
    (cache / ".stage-sub-99-deadbeef").mkdir()  # a half-written subject from the killed run
    finished_before = len(_finished(cache))
    assert 2 <= finished_before < 5

    s = run_preprocess(wl, out, cfg, progress=False)
    assert s.reused == finished_before and s.processed == 5 - finished_before
    assert not list(cache.glob(".stage-*"))
    a, b = _set_bytes(ref), _set_bytes(out)
    assert sorted(a) == sorted(b)
    log = "preprocess_log.jsonl"  # per-sample figures include wall seconds: same keys, not same bytes
    assert [json.loads(x)["key"] for x in a.pop(log).splitlines()] == [json.loads(x)["key"] for x in b.pop(log).splitlines()]
    for name in a:  # shards, index, manifest, rejects: byte-identical
        assert a[name] == b[name], name
    assert gs.ShardSet.open(out).manifest.digest == gs.ShardSet.open(ref).manifest.digest

    # a changed config is not served from the cache
    s2 = run_preprocess(wl, out, make_config("demo", {**CHEAP, "clip_negative": False}), progress=False)
    assert s2.processed == 5 and s2.reused == 0


def test_parts_merge_into_the_same_samples(tmp_path):
    wl = _cheap_worklist(tmp_path)
    cfg = make_config("demo", CHEAP)
    run_preprocess(wl, tmp_path / "ref", cfg, progress=False)
    ref = gs.ShardSet.open(tmp_path / "ref", kind="volumes")
    run_preprocess(wl, tmp_path / "p1", cfg, part=(1, 2), workers=2, progress=False)
    run_preprocess(wl, tmp_path / "p2", cfg, part=(2, 2), progress=False)
    p1, p2 = (gs.ShardSet.open(tmp_path / p) for p in ("p1", "p2"))
    subj = lambda ss: {m.subject for m in ss.metadata().values()}  # noqa: E731
    assert subj(p1).isdisjoint(subj(p2)) and len(subj(p1)) == 3 and len(subj(p2)) == 2
    merge_parts([tmp_path / "p1", tmp_path / "p2"], tmp_path / "merged")
    merged = gs.ShardSet.open(tmp_path / "merged", kind="volumes")
    assert merged.keys() == ref.keys()
    for k in ref.keys():
        np.testing.assert_array_equal(merged.get(k).arrays["volume"], ref.get(k).arrays["volume"])
        assert merged.get(k).meta == ref.get(k).meta
    assert merged.manifest.digest == ref.manifest.digest  # same set as one uninterrupted run


def test_cli_commands_have_help_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="g3n-data")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (ingest, preprocess, check):
        mod.add_command(sub)
    for cmd in ("ingest", "preprocess", "check"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        assert "usage:" in capsys.readouterr().out
    wl = _cheap_worklist(tmp_path, n=1)
    args = parser.parse_args(["preprocess", str(wl), "--out", str(tmp_path / "o"), "--preset", "demo",
                              "--skullstrip", "none", "--no-n4", "--no-register", "--no-progress"])
    assert args.func(args) == 0
    assert "2 samples, 0 rejects" in capsys.readouterr().out
    args = parser.parse_args(["check", str(tmp_path / "o"), "--worklist", str(wl)])
    assert args.func(args) == 0
    assert "OK" in capsys.readouterr().out


def test_console_script_has_every_command(capsys):
    from g3n_data.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("ingest", "preprocess", "synth", "split", "check"):
        assert cmd in out


def test_a_source_changed_since_ingest_is_rejected_and_the_batch_goes_on(tmp_path):
    """Ingest records each file's SHA-256; preprocessing hashes what it reads: a T1 replaced after
    ingest is refused (with both hashes), not processed under the old provenance nor served from the
    cache; the other subject is reused, and once the file is back the subject is processed again."""
    wl = _cheap_worklist(tmp_path, n=2)
    cfg = make_config("demo", CHEAP)
    out = tmp_path / "out"
    run_preprocess(wl, out, cfg, progress=False)
    first = gs.ShardSet.open(out).manifest.digest
    t1 = tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    recorded = gs.ShardSet.open(out).metadata()["r-sub-01-t1"].source_sha256
    t1.unlink()  # a link to the repository's file: replace the link, never touch the file
    t1.write_bytes((TCGA_SRI / TCGA_SRI_FILES["FLAIR"]).read_bytes())  # a valid volume, another file

    s = run_preprocess(wl, out, cfg, progress=False)
    assert (s.processed, s.reused) == (1, 1)  # sub-00 from the cache, sub-01 again
    ss = gs.ShardSet.open(out)
    assert sorted(ss.keys()) == ["r-sub-00-t1", "r-sub-00-t2", "r-sub-01-t2"]
    (r,) = [r for r in gs.RejectLog(out).records() if r.get("key") == "r-sub-01-t1"]
    now = gs.file_sha256(t1)
    assert (r["step"], r["reason"], r["path"]) == ("load", "source changed since ingest", str(t1.absolute()))
    assert r["detail"] == f"sha256 {now}, the work list records {recorded}"
    assert s.rejects_by_step == {"load": 1}
    assert check.check_set(out, worklist=wl)["ok"]  # accounted for: a reject, not a lost input

    # the worker checks the bytes it reads too (a file changed after the driver looked)
    item = next(i for i in run_ingest("bids", tmp_path / "ds", tmp_path / "wl2", ColumnMapping(cohort="R")).items
                if i.key == "r-sub-00-t1")
    stale = item.model_copy(update={"meta": {**item.meta, "source_sha256": "0" * 64}})
    res = process_subject([stale], cfg, load_atlas(cfg.atlas, cfg.geometry))
    assert not res.samples and (res.rejects[0]["step"], res.rejects[0]["reason"]) == ("load", "source changed since ingest")

    t1.unlink()
    link(TCGA_SRI / TCGA_SRI_FILES["T1"], t1)  # the file is back: its reject is not served from the cache
    s = run_preprocess(wl, out, cfg, progress=False)
    assert (s.processed, s.reused) == (1, 1) and gs.ShardSet.open(out).manifest.digest == first
    assert not gs.RejectLog(out).records()
