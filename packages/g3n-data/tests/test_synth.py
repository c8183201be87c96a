"""The synthetic cohort: determinism, and that every label is really in the image.

Label checks measure the *image* (voxel intensities, thresholded volumes) inside regions given
by the ground-truth maps, and compare subjects that differ only by the label under test (same
subject index = same warp and noise draws). Most tests use the tiny 4 mm grid or a few 2 mm
volumes to stay fast on 2 cores.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import g3n_shards as gs
from g3n_data import synth
from g3n_data.synth.config import GEOMETRIES, SynthConfig, make_config
from g3n_data.synth.design import plan_cohort, plan_subject, quota
from g3n_data.synth.render import render_subject, tissue_maps
from g3n_data.synth.template import load_template


@pytest.fixture(scope="module")
def tpl():
    return load_template()


@pytest.fixture(scope="module")
def demo():
    return make_config("demo", seed=11)


@pytest.fixture(scope="module")
def tiny():
    return make_config("tiny", seed=11)


def cohort(cfg: SynthConfig, name: str):
    return next(c for c in cfg.cohorts if c.name == name)


def wmean(x: np.ndarray, w: np.ndarray) -> float:
    return float((x * w).sum() / w.sum())


# ---- template, geometry, design ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 4096])
def test_trilinear_matches_scipy_inside_and_outside_the_grid(chunk):
    """The shared-weight sampler is scipy's order-1 map_coordinates with zero outside, at any
    chunking of the points (7 does not divide their number)."""
    from scipy.ndimage import map_coordinates

    from g3n_data.synth.interp import Trilinear, pad_stack

    rng = np.random.default_rng(3)
    shape = (9, 11, 8)
    chans = [rng.random(shape, dtype=np.float32) for _ in range(3)]
    pts = np.stack([rng.uniform(-2.0, s + 1.0, (5, 6, 7)) for s in shape]).astype(np.float32)
    got = Trilinear(pts, shape)(pad_stack(chans), chunk=chunk)
    for c, ch in enumerate(chans):
        want = map_coordinates(ch.astype(np.float64), pts.astype(np.float64), order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(got[c], want, atol=1e-5)


def test_template_asset_is_a_brain(tpl):
    assert tpl.shape == (80, 96, 80)
    brain_ml = tpl.brain.sum() * 8 / 1000
    assert 1200 < brain_ml < 2000  # MNI152 brain incl. cerebellum and CSF rim
    assert 8 < tpl.ventricles.sum() * 8 / 1000 < 40
    # both hippocampi lie in GM-rich tissue
    assert wmean(tpl.gm, tpl.regions["hippocampus"]) > 0.5
    # the grid is the SRI24 box used by preprocessing (voxel 0 centre = atlas voxel 40.5, 30.5, -2.5)
    assert np.allclose(tpl.affine, GEOMETRIES["demo"].affine)


def test_geometries_cover_the_same_box():
    for g in GEOMETRIES.values():
        corner = g.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
        assert np.allclose(corner[:3], [-39.5, 209.5, -3.5])
    assert GEOMETRIES["paper"].shape == (160, 192, 160) and GEOMETRIES["paper"].patch_size == (16, 16, 16)
    with pytest.raises(ValueError, match="must cover"):
        make_config("demo", geometry={"shape": (80, 96, 81), "spacing": 2.0})


def test_quota_is_exact_and_seeded():
    rng = np.random.default_rng(0)
    labels = quota(rng, 10, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert sorted(labels) == ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    assert quota(np.random.default_rng(1), 7, {"x": 1, "y": 1}) == quota(np.random.default_rng(1), 7, {"x": 1, "y": 1})


def test_plan_covers_classes_and_is_consistent():
    cfg = make_config("tiny", subjects=40, seed=3)
    plans = plan_cohort(cfg)
    assert [p.index for p in plans] == list(range(40))
    assert plans == plan_cohort(cfg)  # pure in (config, seed)
    dx = {p.diagnosis for p in plans}
    assert {"HC", "MCI", "AD", "PD"} <= dx and dx & {"GBM", "glioma"}
    for p in plans:
        ages = [v.age for v in p.visits]
        assert ages == sorted(ages)
        if p.tumour_grade is not None:
            assert p.visits[0].modalities == ["T1", "T1c", "T2", "FLAIR"]
            assert p.diagnosis == ("GBM" if p.tumour_grade == 4 else "glioma")
            assert p.idh1 in ("wildtype", "mutant") and p.mgmt in ("methylated", "unmethylated")
        for v in p.visits:
            c = v.clinical
            if p.diagnosis == "AD":
                assert c["cdr"] >= 1 and c["mmse"] <= 30
            if p.diagnosis == "MCI":
                assert c["cdr"] == 0.5
            if p.diagnosis == "PD":
                assert c["updrs3"] is not None
    assert any(len(p.visits) > 1 for p in plans)


# ---- determinism ------------------------------------------------------------------------


def read_set(path):
    ss = gs.ShardSet.open(path, kind="volumes")
    return {s.key: (s.meta.model_dump(), s.arrays["volume"]) for s in ss}


def test_deterministic_and_independent_of_workers(tmp_path):
    cfg = make_config("tiny", subjects=5, seed=7)
    synth.write_cohort(cfg, tmp_path / "w1", workers=1, progress=False)
    synth.write_cohort(cfg, tmp_path / "w2", workers=2, progress=False)
    a, b = read_set(tmp_path / "w1"), read_set(tmp_path / "w2")
    assert list(a) == list(b) and len(a) >= 5
    for k in a:
        assert a[k][0] == b[k][0]
        assert np.array_equal(a[k][1], b[k][1])
    m1 = json.loads((tmp_path / "w1" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "w2" / "manifest.json").read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert (tmp_path / "w1" / synth.GROUND_TRUTH).read_bytes() == (tmp_path / "w2" / synth.GROUND_TRUTH).read_bytes()
    gt = synth.read_ground_truth(tmp_path / "w1")
    assert set(gt) == set(a)
    # another seed gives other volumes
    other = list(synth.iter_cohort(make_config("tiny", subjects=1, seed=8)))
    first = list(synth.iter_cohort(make_config("tiny", subjects=1, seed=7)))
    assert not np.array_equal(other[0].volume, first[0].volume)


def test_metadata_is_complete(tiny, tpl):
    p = plan_subject(tiny, 0, cohort(tiny, "SYN-ADNI"), "AD", "F", "SYN-S3", None)
    v = render_subject(p, tiny, tpl)[0]
    m = v.meta
    assert m.synthetic and m.cohort == "SYN-ADNI" and m.site == "SYN-S3" and m.diagnosis == "AD"
    assert m.field_strength == 3.0 and m.vendor == "GE" and m.cdr is not None and m.mmse is not None
    assert m.apoe_genotype is not None and m.apoe_e4_carrier == ("4" in m.apoe_genotype)
    assert m.extra["gt_severity"] > 0 and m.extra["gt_hippocampal_loss"] > 0
    assert v.key == gs.sample_key(m)
    assert v.volume.dtype == np.float32 and v.volume.shape == tiny.geometry.shape
    assert np.isfinite(v.volume).all() and v.volume.min() >= 0
    json.dumps(v.truth)  # the ground truth record is JSON


# ---- labels are in the image ----------------------------------------------------------------


def ventricle_ml_from_image(vol: np.ndarray, maps: dict[str, np.ndarray], voxel_ml: float) -> float:
    """CSF-dark voxels of a T1 (below the CSF/GM midpoint) in a central box around the ventricles."""
    wm = np.median(vol[maps["WM"] > 0.9])
    csf_like = (vol > 0) & (vol < 0.55 * wm)
    x, y, z = np.nonzero(maps["ventricles"] > 0.5)
    box = np.zeros_like(csf_like)
    pad = 4
    box[max(x.min() - pad, 0): x.max() + pad, max(y.min() - pad, 0): y.max() + pad, max(z.min() - pad, 0): z.max() + pad] = 1
    return float((csf_like & box).sum() * voxel_ml)


def test_ventricles_grow_with_age_within_subject(demo, tpl):
    p = plan_subject(demo, 4, cohort(demo, "SYN-LIFESPAN"), "HC", "F", "SYN-S2", None, age0=30,
                     visit_years=[0, 25, 50], modalities=["T1"])
    vols = render_subject(p, demo, tpl)
    assert [v.meta.session for v in vols] == ["ses-1", "ses-2", "ses-3"]
    assert len({v.meta.subject for v in vols}) == 1
    maps0 = tissue_maps(p, demo, 0, tpl)  # the region box from the first visit, for every visit
    measured = [ventricle_ml_from_image(v.volume, maps0, 0.008) for v in vols]
    truth = [v.meta.extra["gt_ventricle_ml"] for v in vols]
    assert truth[0] < truth[1] < truth[2]
    assert measured[0] < measured[1] < measured[2], measured
    assert measured[2] > 1.15 * measured[0]
    # cortical thinning: grey matter (image-side: mean T1 over the cortex ribbon drops)
    gm = [v.meta.extra["gt_gm_ml"] for v in vols]
    assert gm[0] > gm[1] > gm[2]
    ribbon = (maps0["GM"] > 0.5).astype(np.float32)
    rel = [wmean(v.volume, ribbon) / np.median(v.volume[maps0["WM"] > 0.9]) for v in vols]
    assert rel[0] > rel[2]


def test_white_matter_hyperintensities_grow_with_age_in_flair(tiny, tpl):
    p = plan_subject(tiny, 6, cohort(tiny, "SYN-ADNI"), "HC", "F", "SYN-S3", None, age0=30, visit_years=[0, 55],
                     modalities=["FLAIR"])  # fmt: skip
    young, old = render_subject(p, tiny, tpl)
    maps = tissue_maps(p, tiny, 0, tpl)
    assert old.meta.extra["gt_wmh_ml"] > 5 * max(young.meta.extra["gt_wmh_ml"], 0.1)
    rel = [wmean(v.volume, maps["periventricular"]) / np.median(v.volume[maps["GM"] > 0.5]) for v in (young, old)]
    assert rel[1] > rel[0] + 0.05, rel


def test_males_have_larger_brains(tiny, tpl):
    sizes = {"F": [], "M": []}
    life = cohort(tiny, "SYN-LIFESPAN")
    for i in range(6):
        for sex in ("F", "M"):
            p = plan_subject(tiny, 20 + 2 * i + (sex == "M"), life, "HC", sex, "SYN-S1", None, age0=50, modalities=["T1"])
            v = render_subject(p, tiny, tpl)[0]
            sizes[sex].append((v.volume > 0).sum())  # skull-stripped: the brain is the non-zero voxels
    assert np.mean(sizes["M"]) > 1.05 * np.mean(sizes["F"])


def test_hippocampus_hc_gt_mci_gt_ad_at_equal_age(demo, tpl):
    adni = cohort(demo, "SYN-ADNI")
    for idx in (0,):
        region = tissue_maps(plan_subject(demo, idx, adni, "HC", "F", "SYN-S3", None, age0=75), demo, 0, tpl)
        rel = {}
        for dx in ("HC", "MCI", "AD"):
            p = plan_subject(demo, idx, adni, dx, "F", "SYN-S3", None, age0=75, modalities=["T1"])
            v = render_subject(p, demo, tpl)[0]
            wm = np.median(v.volume[region["WM"] > 0.9])
            rel[dx] = wmean(v.volume, region["hippocampus"]) / wm
            if dx == "AD":
                assert v.meta.cdr >= 1 and v.meta.mmse < 27
        assert rel["HC"] > rel["MCI"] > rel["AD"], rel
        assert rel["HC"] - rel["AD"] > 0.02


def test_pd_signature_in_t2(tiny, tpl):
    ppmi = cohort(tiny, "SYN-PPMI")
    vals = {}
    for dx in ("HC", "PD"):
        p = plan_subject(tiny, 3, ppmi, dx, "M", "SYN-S5", None, age0=65, modalities=["T2"])
        v = render_subject(p, tiny, tpl)[0]
        maps = tissue_maps(p, tiny, 0, tpl)
        vals[dx] = wmean(v.volume, maps["pd"]) / np.median(v.volume[maps["mask"] > 0])
    assert vals["PD"] < 0.97 * vals["HC"]


def test_modality_contrasts(demo, tpl):
    p = plan_subject(demo, 2, cohort(demo, "SYN-LIFESPAN"), "HC", "M", "SYN-S2", None, age0=40,
                     modalities=["T1", "T1c", "T2", "FLAIR"])
    maps = tissue_maps(p, demo, 0, tpl)
    mean = {}
    for v in render_subject(p, demo, tpl):
        mean[v.meta.modality] = {t: wmean(v.volume, (maps[t] > 0.9).astype(np.float32)) for t in ("CSF", "GM", "WM")}
    for m in ("T1", "T1c"):
        assert mean[m]["WM"] > mean[m]["GM"] > mean[m]["CSF"], (m, mean[m])
    assert mean["T2"]["CSF"] > mean["T2"]["GM"] > mean["T2"]["WM"], mean["T2"]
    assert mean["FLAIR"]["GM"] > mean["FLAIR"]["WM"] > mean["FLAIR"]["CSF"], mean["FLAIR"]
    assert mean["FLAIR"]["CSF"] < 0.3 * mean["FLAIR"]["GM"]


def lesion_stats(cfg, tpl, idx, idh):
    p = plan_subject(cfg, idx, cohort(cfg, "SYN-GLIOMA"), "glioma", "M", "SYN-S6", idh)
    vols = {v.meta.modality: v for v in render_subject(p, cfg, tpl)}
    maps = tissue_maps(p, cfg, 0, tpl)
    wm = np.median(vols["T1"].volume[maps["WM"] > 0.9])
    solid = maps["tumour"]
    enh = wmean(vols["T1c"].volume - vols["T1"].volume, solid) / wm
    # lesion present: T2 (and FLAIR unless the T2-FLAIR mismatch sign is drawn) in the lesion
    # relative to normal-appearing white matter of the same image
    lesion = np.clip(maps["tumour"] + maps["necrosis"] + maps["oedema"], 0, 1)
    normal_wm = maps["WM"] > 0.9
    contrast = {m: wmean(vols[m].volume, lesion) / np.median(vols[m].volume[normal_wm]) for m in ("T2", "FLAIR")}
    return p, enh, contrast, vols["T1"].meta


def test_glioma_lesion_and_enhancement_by_idh(demo, tpl):
    wt = [lesion_stats(demo, tpl, 100 + i, "wildtype") for i in range(2)]
    mu = [lesion_stats(demo, tpl, 200 + i, "mutant") for i in range(2)]
    for p, enh, contrast, meta in wt + mu:
        assert contrast["T2"] > 1.3, (p.idh1, contrast)  # the lesion is there, bright in T2
        if p.latent["flair_mismatch"]:
            assert contrast["FLAIR"] < contrast["T2"] - 0.2, contrast
        else:
            assert contrast["FLAIR"] > 1.3, contrast
        assert meta.extra["gt_tumour_ml"] > 3
        assert meta.idh1 == p.idh1 and meta.tumour_grade == p.tumour_grade
    for pw, ew, *_ in wt:
        for pm, em, *_ in mu:
            if pw.tumour_grade == 4 and pm.tumour_grade < 4:
                assert ew > em + 0.2, (ew, em)
    assert np.mean([e for _, e, _, _ in wt]) > np.mean([e for _, e, _, _ in mu]) + 0.2
    # location: IDH1-mutant frontal, wildtype temporal or deep
    for p, *_ in mu:
        assert p.latent["lesion_region"] == "frontal" and p.latent["lesion_centre_mni"][1] > 10
    for p, *_ in wt:
        assert p.latent["lesion_region"] in ("temporal", "deep") and p.latent["lesion_centre_mni"][1] < 10


def test_site_effects(tiny, tpl):
    life = cohort(tiny, "SYN-LIFESPAN")
    med = {}
    for site in ("SYN-S1", "SYN-S3"):
        p = plan_subject(tiny, 5, life, "HC", "F", site, None, age0=40, modalities=["T1"])
        v = render_subject(p, tiny, tpl)[0]
        med[site] = np.median(v.volume[v.volume > 0])
        assert v.meta.field_strength == next(s.field_strength for s in tiny.sites if s.name == site)
        site_spec = next(s for s in tiny.sites if s.name == site)
        assert v.meta.extra["gt_noise_sigma"] == pytest.approx(site_spec.noise * site_spec.intensity_scale)
    scale = {s.name: s.intensity_scale for s in tiny.sites}
    ratio = med["SYN-S3"] / med["SYN-S1"]
    # the intensity scale dominates; bias field and per-scan jitter move it by tens of percent
    assert ratio > 1.8 and abs(ratio / (scale["SYN-S3"] / scale["SYN-S1"]) - 1) < 0.35


def test_paper_geometry_matches_demo(tpl):
    paper, demo = make_config("paper", seed=1), make_config("demo", seed=1)
    life = paper.cohorts[0]
    vp = render_subject(plan_subject(paper, 0, life, "HC", "M", "SYN-S2", None, age0=50, modalities=["T1"]), paper, tpl)[0]
    vd = render_subject(plan_subject(demo, 0, life, "HC", "M", "SYN-S2", None, age0=50, modalities=["T1"]), demo, tpl)[0]
    assert vp.volume.shape == (160, 192, 160)
    assert abs(vp.meta.extra["gt_brain_ml"] / vd.meta.extra["gt_brain_ml"] - 1) < 0.02
    down = vp.volume.reshape(80, 2, 96, 2, 80, 2).mean(axis=(1, 3, 5))
    assert np.corrcoef(down.ravel(), vd.volume.ravel())[0, 1] > 0.9


# ---- CLI ----------------------------------------------------------------------------------


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="g3n-data")
    synth.add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_a_volumes_set(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = run_cli(["synth", "--out", str(out), "--subjects", "3", "--seed", "4", "--geometry", "tiny", "--no-progress"])
    assert rc == 0
    ss = gs.ShardSet.open(out, kind="volumes")
    assert ss.manifest.geometry.shape == (40, 48, 40)
    assert ss.manifest.producer.config["synth"]["seed"] == 4
    assert len({m.subject for m in ss.metadata().values()}) == 3
    ss.verify()
    # refuses to overwrite without --overwrite, with a clear message
    rc = run_cli(["synth", "--out", str(out), "--subjects", "3", "--geometry", "tiny", "--no-progress"])
    assert rc == 1 and "already holds" in capsys.readouterr().err


def test_subject_prefix_names_a_second_cohort_that_merges_with_the_first(tmp_path, capsys):
    """Extra pretraining subjects come from another seed under their own prefix: only the names
    change (not the volumes), and the two sets merge without a key collision."""
    a, b = make_config("tiny", subjects=2, seed=4), make_config("tiny", subjects=2, seed=4, subject_prefix="pre")
    va, vb = list(synth.iter_cohort(a)), list(synth.iter_cohort(b))
    assert [v.key.replace("-syn0", "-pre0") for v in va] == [v.key for v in vb]
    assert all(np.array_equal(x.volume, y.volume) for x, y in zip(va, vb))
    argv = ["synth", "--subjects", "2", "--geometry", "tiny", "--no-progress"]
    assert run_cli([*argv, "--out", str(tmp_path / "syn"), "--seed", "4"]) == 0
    assert run_cli([*argv, "--out", str(tmp_path / "pre"), "--seed", "5", "--subject-prefix", "pre"]) == 0
    subjects = {m.subject for m in gs.ShardSet.open(tmp_path / "pre", kind="volumes").metadata().values()}
    assert subjects == {"pre00000", "pre00001"}
    gs.merge_shard_sets([tmp_path / "syn", tmp_path / "pre"], tmp_path / "all")
    sizes = [len(gs.ShardSet.open(tmp_path / n).metadata()) for n in ("syn", "pre", "all")]
    assert sizes[2] == sizes[0] + sizes[1]
    with pytest.raises(ValueError, match="subject_prefix"):
        make_config("tiny", subject_prefix="Pre-1")


def test_cli_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("subjects: 2\nnot_a_field: 1\n")
    rc = run_cli(["synth", "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert rc == 2 and "not_a_field" in capsys.readouterr().err
    bad.write_text("[1, 2\n")
    assert run_cli(["synth", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "c.yaml" in capsys.readouterr().err


def test_asset_provenance_matches_the_sources():
    """The packaged template records the sha256 of the files it was made from (tools/make_synth_assets.py):
    the SRI24 registration target is the atlas this package ships (t1_brain_1mm.nii.gz is that file,
    renamed), hashed here; the three MNI152 files (not shipped, 5 MB) must be the ones PROVENANCE.md names."""
    import hashlib
    import re
    from importlib import resources

    assets = resources.files("g3n_data") / "synth_assets"
    with resources.as_file(assets / "mni152_sri24_2mm.npz") as p, np.load(p) as d:
        recorded = dict(str(s).split(" sha256=") for s in d["sources"])
        assert float(d["registration_dice"]) > 0.95
    assert len(recorded) == 4
    atlas = resources.files("g3n_data") / "atlases" / "sri24" / "t1_brain_1mm.nii.gz"
    assert hashlib.sha256(atlas.read_bytes()).hexdigest() == recorded.pop("t1_skullstripped_brats_space.nii.gz")
    documented = dict(re.findall(r"`(mni_icbm152_\w+\.nii\.gz)` sha256 `([0-9a-f]{64})`",
                                 (assets / "PROVENANCE.md").read_text(encoding="utf-8")))
    assert documented == recorded


def test_synth_anatomy_command_writes_the_spec_and_its_regions(tmp_path, capsys):
    import yaml

    from g3n_data.cli import main
    from g3n_data.synth.anatomy import REGIONS_NAME, SPEC_NAME

    assert main(["synth-anatomy", "--out", str(tmp_path), "--geometry", "tiny"]) == 0
    assert "40x48x40 grid" in capsys.readouterr().out
    spec = yaml.safe_load((tmp_path / SPEC_NAME).read_text())
    with np.load(tmp_path / REGIONS_NAME, allow_pickle=False) as z:
        regions = {k: z[k] for k in z.files}
    named = {spec["brain"]} | {s[k] for s in spec["signatures"] for k in ("region", "reference") if s.get(k)}
    assert named == set(regions)
    assert all(r.shape == (40, 48, 40) and r.dtype == np.float32 and 0 <= r.min() and r.max() <= 1 for r in regions.values())
    assert {e["signature"] for e in spec["effects"]} <= {s["name"] for s in spec["signatures"]}
    assert spec["within"] == "cohort"  # real effects within a cohort: PD and glioma come from one cohort each
    # the effects' reasons quote the generative model's own numbers
    why = {e["to"]: e["why"] for e in spec["effects"]}
    assert "1.8 mm" in why["AD"] and "10%" in why["PD"]
