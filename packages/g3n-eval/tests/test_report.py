"""The report: built from the measurement outputs, then opened in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from g3n_eval.cli import main
from PIL import Image

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or "")
                 if p and Path(p).is_file()), None)


@pytest.fixture(scope="module")
def report(runs, work, volumes_set):
    out_dir, _ = runs
    dest = work / "report"
    probe_run = work / "probe-run"  # the file g3n-probe's write_run produces (results.csv)
    probe_run.mkdir(exist_ok=True)
    (probe_run / "results.csv").write_text(
        "task,slice,metric,mean,sd,folds,subjects,volumes,units,classes,notes\n"
        "sex,T1,auc,0.9671,0.012,5,120,120,120,F|M,\nbrain_age,T1,mae,4.43,0.3,5,120,120,120,,\n")
    rc = main(["report", "--probe-run", str(probe_run), str(out_dir / "recon"), str(out_dir / "fidelity"), str(out_dir / "controllability"),
               str(out_dir / "memorisation"), str(out_dir / "forecast"), "--volumes", f"real={volumes_set}",
               "--out", str(dest), "--no-progress"])
    assert rc == 0
    return dest


def test_report_content(report, volumes_set):
    page = (report / "index.html").read_text()
    assert "0.9671" in page and "brain_age" in page
    for heading in ("Linear probes", "Reconstruction", "Controllability", "Fidelity", "Memorisation audit", "Longitudinal forecasts", "Provenance"):
        assert f"<h2>{heading}</h2>" in page
    assert "Paired, within each baseline: predicted ageing rose with the interval for " in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 7
    for s in srcs:  # every image is a local PNG beside the page (self-contained folder)
        assert "/" not in s and (report / s).is_file() and (report / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<script" not in page
    import g3n_shards as gs

    assert gs.ShardSet.open(volumes_set).digest in page  # provenance lists the inputs' manifest digests
    assert "sweep" in page and "weights_digest" in page


def _screenshot(html: Path, png: Path, tmp: Path) -> np.ndarray:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp}", f"--screenshot={png}", "--window-size=1200,2000", html.resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return np.asarray(Image.open(png).convert("L"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) - browser check skipped")
def test_report_renders_in_a_browser(report, tmp_path):
    shot = _screenshot(report / "index.html", tmp_path / "shot.png", tmp_path / "profile")
    # control: the same page with every image link broken
    broken = report / "broken.html"
    broken.write_text(re.sub(r'<img src="([^"]+)"', r'<img src="missing-\1"', (report / "index.html").read_text()))
    ctrl = _screenshot(broken, tmp_path / "ctrl.png", tmp_path / "profile2")
    broken.unlink()
    assert shot.shape == ctrl.shape

    def dense_blocks(a: np.ndarray) -> np.ndarray:
        # 32x32 blocks that are mostly not white paper: text and table rules are sparse on white,
        # rendered images (brain montages, maps, histograms) fill their blocks
        h, w = a.shape[0] // 32 * 32, a.shape[1] // 32 * 32
        b = a[:h, :w].reshape(h // 32, 32, w // 32, 32).swapaxes(1, 2).reshape(h // 32, w // 32, -1)
        return b[b.mean(-1) < 215]

    img, ctl = dense_blocks(shot), dense_blocks(ctrl)
    assert len(img) >= 200, len(img)  # at least ~200k pixels of rendered figures
    assert len(img) > 10 * max(len(ctl), 1), (len(img), len(ctl))
    assert len(np.unique(img)) > 100  # many grey levels: pictures, not flat boxes


def test_control_section_shows_paired_rows_and_flags_a_blind_probe():
    from g3n_eval.report import _control_section

    def row(real_auc, moved):
        return {"real": {"agreement": 0.7, "auc": real_auc}, "cond": {"agreement": 0.6, "auc": 0.7, "n": 16},
                "null": {"fraction": None, "class": None, "n": 0}, "prior": {"fraction": 0.6, "class": "HC", "n": 40},
                "paired": {"n_groups": 8, "n_moved": moved, "n_against": 8 - moved, "mean_shift": 0.1, "p": 0.0039}}

    doc = {"settings": {"space": "latent", "generated_path": "latents", "generation": {"paired": True}},
           "results": {"tasks": {"diagnosis:HC-vs-AD": {**row(0.8, 8), "real_slice": {"modality": "T1"}},
                                 "diagnosis:MCI-vs-AD": row(0.3, 6)},
                       "sweeps": {"age": {"real_slice": {"modality": "T1", "sex": "F"}, "slope": 0.5, "pearson_r": 0.7, "levels": {"30": {"n": 8, "mean": 40.0, "std": 2.0}},
                                          "paired": {"n_groups": 8, "n_moved": 7, "mean_slope": 0.4, "p": 0.035}}}}}
    page = _control_section(doc)
    assert "paired moved" in page and "8/8" in page and "6/8" in page
    assert "Real p:" not in page  # an older document: no permutation test, the AUC rule
    assert "slope positive in 7/8 groups" in page
    assert "fitted on" in page and '<td class="l">T1</td>' in page and '<td class="l">all</td>' in page  # the second row: an older document
    assert "probe fitted on modality=T1, sex=F" in page
    assert "Blind probes (cross-validated AUC" in page and "either way): diagnosis:MCI-vs-AD.</p>" in page
    # with the permutation test, a probe at AUC 0.8 that does not beat its shuffles is blind too
    doc["settings"]["probe"] = {"real_permutations": 19}
    doc["results"]["tasks"]["diagnosis:HC-vs-AD"]["real"]["permutation"] = {"permutations": 19, "p": 0.1, "null95": 0.85}
    doc["results"]["tasks"]["diagnosis:MCI-vs-AD"]["real"]["permutation"] = {"permutations": 19, "p": 0.05, "null95": 0.25}
    page = _control_section(doc)
    assert "Real p: the probe's cross-validation on real data re-run on 19 shuffled labellings" in page
    assert ">0.1 (0.85)</td>" in page and ">0.05 (0.25)</td>" in page
    assert "Blind probes (real p above 0.05; rows without the test: cross-validated AUC" in page and "either way): diagnosis:HC-vs-AD.</p>" in page
