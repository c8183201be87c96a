"""The synthetic cohort's anatomy spec (g3n-data) measured by g3n-eval on rendered volumes: the same
subject rendered with each label moves every signature the way the spec says (ground truth, no
training), and the spec is valid on every geometry."""

from __future__ import annotations

import numpy as np
import pytest

from g3n_data.synth import make_config, render_subject
from g3n_data.synth.anatomy import anatomy_spec, write_anatomy_spec
from g3n_data.synth.design import plan_subject
from g3n_data.synth.template import load_template
from g3n_eval.anatomy import Anatomy, AnatomySpec


@pytest.fixture(scope="module")
def demo():
    return make_config("demo", seed=5)


def _t1(cfg, index, cohort, diagnosis, idh=None, modality="T1", age=70.0):
    c = next(c for c in cfg.cohorts if c.name == cohort)
    plan = plan_subject(cfg, index, c, diagnosis, "F", c.sites[0], idh, age0=age, visit_years=[0.0],
                        modalities=[modality])
    return render_subject(plan, cfg, load_template())[0].volume


def test_each_label_moves_its_signature_as_the_spec_says(tmp_path, demo):
    anatomy = Anatomy.load(write_anatomy_spec(tmp_path, demo))
    effects = {e.name: e for e in anatomy.spec.effects}
    for i in range(2):  # the same subject (index) with each label: only the label's effect differs
        hc = anatomy.signatures(_t1(demo, i, "SYN-ADNI", "HC"))
        ad = anatomy.signatures(_t1(demo, i, "SYN-ADNI", "AD"))
        mci = anatomy.signatures(_t1(demo, i, "SYN-ADNI", "MCI"))
        young = anatomy.signatures(_t1(demo, i, "SYN-ADNI", "HC", age=30.0))
        assert ad["ventricle_signal"] < mci["ventricle_signal"] < hc["ventricle_signal"] < young["ventricle_signal"]
        hc_pd = anatomy.signatures(_t1(demo, 10 + i, "SYN-PPMI", "HC"))
        pd = anatomy.signatures(_t1(demo, 10 + i, "SYN-PPMI", "PD"))
        assert pd["putamen_vs_white_matter"] < hc_pd["putamen_vs_white_matter"] - 0.03
        wt = anatomy.signatures(_t1(demo, 20 + i, "SYN-GLIOMA", "glioma", "wildtype", "T1c", 50.0))
        mut = anatomy.signatures(_t1(demo, 20 + i, "SYN-GLIOMA", "glioma", "mutant", "T1c", 50.0))
        assert mut["tumour_frontality"] > 0 > wt["tumour_frontality"]
    assert {e.expect for e in effects.values()} == {"increase", "decrease"}
    assert set(effects) == {"diagnosis:HC->AD [T1]", "diagnosis:HC->MCI [T1]", "diagnosis:HC->PD [T1]",
                            "idh1:wildtype->mutant [T1c]", "age:30->70 [T1]"}


def _shares(regions: dict[str, np.ndarray]) -> dict[str, float]:
    brain = (regions["brain"] > 0.5).sum()
    return {k: float((r > 0.5).sum() / brain) for k, r in regions.items()}


@pytest.mark.parametrize("geometry", ["tiny", "paper"])
def test_the_spec_is_valid_on_every_geometry(geometry, demo):
    cfg = make_config(geometry)
    spec, regions = anatomy_spec(cfg)
    anatomy = Anatomy(AnatomySpec.model_validate(spec), regions, geometry)
    assert anatomy.shape == tuple(cfg.geometry.shape)
    # the mid-sagittal plane sits near the grid's centre, and the brain mask is symmetric about it
    assert abs(spec["midline"] - (cfg.geometry.shape[0] - 1) / 2) < 2
    brain = anatomy.masks["brain"]
    assert (brain & (anatomy._mirror(brain.astype(np.float64)) > 0)).sum() > 0.9 * brain.sum()
    demo_spec, demo_regions = anatomy_spec(demo)
    assert spec["midline"] == pytest.approx((demo_spec["midline"] + 0.5) * 2.0 / cfg.geometry.spacing - 0.5, abs=1e-3)
    shares, demo_shares = _shares(regions), _shares(demo_regions)
    for k in shares:  # resampling keeps each region's share of the brain
        assert shares[k] == pytest.approx(demo_shares[k], rel=0.35 if geometry == "tiny" else 0.1), k
