"""The report: built from the measurement outputs, then opened in a real headless browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from g3n_eval.cli import main
from PIL import Image, ImageDraw

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
    # no absolute path of the machine: everything relative to the root, here the parent of the out folder's parent
    assert str(report.parent) not in page and str(report.parent.parent) + "/" not in page


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


# ---- paths relative to the run folder, whole row labels (fast: no measurement is run) ----------

LONG_CONDITIONS = {"diagnosis": "AD", "modality": "T1", "sex": "F", "age": 71.5, "site": "site-with-a-long-name"}


def _tiny_run(run: Path) -> dict[str, Path]:
    """A run folder as g3n-pipeline leaves it, with one hand-written metrics file (memorisation),
    a probe run, a real and a synthetic volumes set: everything a report reads, in ~1 s."""
    import g3n_shards as gs
    from g3n_eval.records import input_ref, write_metrics
    from g3n_shards.testing import brain_like, write_volume_set

    (run / ".stages").mkdir(parents=True)
    real = run / "volumes-test"
    write_volume_set(real, n=2, shape=(16, 20, 16), extra={"intensity": "scanner"})
    gen = run / "samples-decoded"
    rng = np.random.default_rng(0)
    with gs.ShardWriter(gen, kind="volumes", producer=gs.Producer(package="g3n-eval-tests"),
                        geometry=gs.Geometry(shape=(16, 20, 16), spacing=(2.0, 2.0, 2.0), patch_size=(4, 4, 4)),
                        extra={"intensity": "scanner"}) as w:
        for i in range(2):
            meta = gs.SampleMeta(subject=f"syn-0123abcd-{i}-{1000 + i}", cohort="synthetic", modality="T1",
                                 synthetic=True, request={"stage": "sample", "conditions": LONG_CONDITIONS, "seed": i})
            w.write(gs.sample_key(meta), meta, {"volume": brain_like(rng, (16, 20, 16))})
    memo = run / "eval" / "memorisation"
    memo.mkdir(parents=True)
    Image.new("RGB", (40, 30), "gray").save(memo / "memorisation_hist.png")
    stats = {"mean": 1.0, "min": 0.5, "median": 1.0}
    write_metrics(memo / "memorisation.json", "memorisation",
                  {"percentile": 1.0, "max_fraction_below": 0.05, "min_ratio": 0.9, "alpha": 0.05,
                   "checkpoint": str(run / "dit" / "model.safetensors"), "note": f"latents read from {run}/samples"},
                  [input_ref(real, "heldout"), input_ref(run / "samples", "synthetic")],
                  {"memorisation": False, "syn_to_train": stats, "heldout_to_train": stats, "n_synthetic": 2,
                   "n_heldout": 2, "ratio_of_means": 1.0, "fraction_below": 0.0, "threshold": 0.5,
                   "expected_fraction": 0.01, "p_value": 1.0, "n_copies": 0, "dim": 8, "n_train": 2,
                   "reasons": [f"{run}/samples: checked"], "figures": {"memorisation_hist": "memorisation_hist.png"}})
    probe = run / "probe"
    probe.mkdir()
    (probe / "results.csv").write_text("task,slice,metric,mean\nsex,T1,auc,0.9671\n")
    return {"real": real, "gen": gen, "memo": memo, "probe": probe}


def test_report_shows_no_path_of_the_machine_and_whole_row_labels(tmp_path):
    run = tmp_path / "machine" / "runs" / "demo"
    sets = _tiny_run(run)
    dest = run / "eval" / "report"
    assert main(["report", str(sets["memo"]), "--probe-run", str(sets["probe"]), "--volumes", f"real={sets['real']}",
                 "--volumes", f"generated={sets['gen']}", "--out", str(dest), "--no-progress"]) == 0
    page = (dest / "index.html").read_text()
    assert str(tmp_path) not in page and str(tmp_path.resolve()) not in page
    # every set, file and folder named relative to the run folder (found by its .stages folder)
    assert '<td class="l">volumes-test</td>' in page and '<td class="l">samples</td>' in page  # provenance
    assert '<td class="l">probe</td>' in page and "From <code>probe</code>" in page
    assert "<code>eval/memorisation/memorisation.json</code>" in page
    assert "real: volumes-test" in page and "generated: samples-decoded" in page  # montage captions
    assert "dit/model.safetensors" in page and "latents read from samples" in page and "samples: checked" in page
    # each montage row's whole label, as text beside its image
    import g3n_shards as gs

    for key, meta in gs.ShardSet.open(sets["gen"]).metadata().items():
        label = f"generated {key} (age=71.5, diagnosis=AD, modality=T1, sex=F, site=site-with-a-long-name)"
        assert len(label) > 80 and f"<li>{label}</li>" in page
    for key in gs.ShardSet.open(sets["real"]).keys():
        assert f"<li>real {key}</li>" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) == 3 and all((dest / s).is_file() for s in srcs)


def test_report_root_option_and_the_root_it_finds(tmp_path, monkeypatch):
    from g3n_eval.report import PathView, find_root

    run = tmp_path / "runs" / "demo"
    _tiny_run(run)
    assert find_root(run / "eval" / "report") == run  # the .stages folder marks the run
    plain = tmp_path / "plain" / "x" / "eval" / "report"
    assert find_root(plain) == tmp_path / "plain" / "x"  # no marker: RUN of RUN/eval/report
    plain.mkdir(parents=True)
    (tmp_path / "plain" / "demo-config.json").write_text("{}")
    assert find_root(plain) == tmp_path / "plain"
    monkeypatch.chdir(run)  # relative arguments are relative to the current folder
    dest = tmp_path / "elsewhere" / "report"
    assert main(["report", "eval/memorisation", "--volumes", "real=volumes-test", "--root", str(run),
                 "--out", str(dest), "--no-progress"]) == 0
    page = (dest / "index.html").read_text()
    assert str(tmp_path) not in page and "real: volumes-test" in page and '<td class="l">samples</td>' in page
    # a path outside the root is shown as given; relative paths (recorded by another command) as given
    v = PathView(run)
    assert v.path(run / "eval" / "recon") == "eval/recon" and v.path(run) == "."
    assert v.path("/elsewhere/set") == "/elsewhere/set" and v.path("data/set") == "data/set"
    assert v.text(f"cannot read {run}/samples: bad; {run}") == "cannot read samples: bad; ."
    assert v.text(f"{run}-old/x and /data{run}") == f"{run}-old/x and /data{run}"  # only the root itself


def test_montage_row_labels_are_drawn_whole(tmp_path):
    from g3n_eval.figures import CELL, LABEL_W, LABEL_PAD, row_label_layout, volume_montage, wrap_label

    long = "generated synthetic-syn-0123abcd-7-1007-t1 (diagnosis=AD, modality=T1, sex=F, age=71.5)"
    width, lines = row_label_layout([long, "real sub-001"])
    assert width > LABEL_W and ["".join(x) for x in lines] == [long, "real sub-001"]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    assert all(measure(line) <= width - 2 * LABEL_PAD for line in lines[0])
    very_long = "x" * 400 + "-" + "y" * 50
    wrapped = wrap_label(very_long, 100)
    assert "".join(wrapped) == very_long and len(wrapped) > 1 and all(measure(w) <= 100 for w in wrapped)
    vol = np.random.default_rng(0).random((16, 20, 16)).astype(np.float32)
    png = volume_montage([vol, vol], [long, "real sub-001"], tmp_path / "m.png")
    assert Image.open(png).size == (width + 3 * CELL, 18 + 2 * CELL)
