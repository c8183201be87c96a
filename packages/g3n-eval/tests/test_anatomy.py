"""Anatomy: signatures on hand-made volumes, real effects, paired generated changes, bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import g3n_shards as gs
from g3n_eval.anatomy import Anatomy, AnatomySpec
from g3n_eval.cli import main
from g3n_eval.data import InputError
from g3n_eval.report import build_report

SHAPE = (16, 12, 10)
MIDLINE = 7.5  # x -> 15 - x


def _box(*sl) -> np.ndarray:
    m = np.zeros(SHAPE, np.float32)
    m[sl] = 1.0
    return m


def _mirrored(m: np.ndarray) -> np.ndarray:
    return np.maximum(m, m[::-1])


REGIONS = {
    "brain": _box(slice(1, 15), slice(1, 11), slice(1, 9)),
    "roi": _box(slice(4, 7), slice(4, 7), slice(3, 6)),
    "ref": _box(slice(9, 12), slice(4, 7), slice(3, 6)),
    "site_a": _mirrored(_box(slice(2, 5), slice(2, 5), slice(2, 5))),
    "site_b": _mirrored(_box(slice(2, 5), slice(7, 10), slice(5, 8))),
}
SPEC = {
    "source": "a test world",
    "regions": "regions.npz",
    "brain": "brain",
    "midline": MIDLINE,
    "signatures": [
        {"name": "roi_signal", "kind": "mean", "region": "roi"},
        {"name": "roi_vs_ref", "kind": "contrast", "region": "roi", "reference": "ref"},
        {"name": "site_a_lesion", "kind": "asymmetry", "region": "site_a", "reference": "site_b"},
    ],
    "effects": [
        {"field": "diagnosis", "from": "HC", "to": "AD", "modality": "T1", "signature": "roi_vs_ref",
         "expect": "decrease", "why": "AD darkens the roi"},
        {"field": "idh1", "from": "wildtype", "to": "mutant", "modality": "T1c", "signature": "site_a_lesion",
         "expect": "increase"},
        {"field": "age", "from": 30, "to": 70, "modality": "T1", "signature": "roi_signal", "expect": "decrease"},
    ],
}


def volume(rng, *, dark: float = 0.0, lesion: str | None = None, side: int = 0) -> np.ndarray:
    v = np.where(REGIONS["brain"] > 0, 100.0 + rng.normal(0, 5, SHAPE), 0.0)
    v[4:7, 4:7, 3:6] -= dark
    if lesion:
        x = slice(2, 5) if side == 0 else slice(11, 14)
        v[(x, slice(2, 5), slice(2, 5)) if lesion == "mutant" else (x, slice(7, 10), slice(5, 8))] += 60.0
    return v.astype(np.float32)


def write_spec(folder: Path, spec: dict | None = None, regions: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "regions.npz", **(REGIONS if regions is None else regions))
    (folder / "anatomy.yaml").write_text(yaml.safe_dump(SPEC if spec is None else spec))
    return folder / "anatomy.yaml"


def write_set(path: Path, items, shape=SHAPE) -> Path:
    with gs.ShardWriter(path, kind="volumes", producer=gs.Producer(package="g3n-eval-tests"),
                        geometry=gs.Geometry(shape=shape, spacing=(2.0, 2.0, 2.0), patch_size=(2, 2, 2))) as w:
        for meta, v in items:
            w.write(gs.sample_key(meta), meta, {"volume": v})
    return path


def test_signatures_are_region_means_contrasts_and_asymmetries(tmp_path):
    a = Anatomy.load(write_spec(tmp_path))
    rng = np.random.default_rng(0)
    v = volume(rng, dark=30.0, lesion="mutant", side=1)
    s = a.signatures(v)
    brain = REGIONS["brain"] > 0
    z = (v - v[brain].mean()) / v[brain].std()
    assert s["roi_signal"] == pytest.approx(z[4:7, 4:7, 3:6].mean())
    assert s["roi_vs_ref"] == pytest.approx(z[4:7, 4:7, 3:6].mean() - z[9:12, 4:7, 3:6].mean())
    asym = np.abs(z - z[::-1])  # midline 7.5 on a 16-voxel axis: the plain flip
    assert s["site_a_lesion"] == pytest.approx(asym[REGIONS["site_a"] > 0].mean() - asym[REGIONS["site_b"] > 0].mean())
    assert s["site_a_lesion"] > 1.0  # the lesion, on either side, shows at site a
    assert a.signatures(volume(rng, lesion="wildtype"))["site_a_lesion"] < -1.0
    # a mid-plane off the grid's centre mirrors about it: x -> 14 - x, column 15 has no mirror
    b = Anatomy(AnatomySpec.model_validate({**SPEC, "midline": 7.0}), REGIONS)
    m = b._mirror(np.arange(16.0)[:, None, None] * np.ones(SHAPE))
    assert m[0, 0, 0] == 14 and m[14, 0, 0] == 0 and m[15, 0, 0] == 0


def test_reconstructions_say_how_much_of_each_effect_the_decoder_draws(tmp_path, capsys):
    """A decoder that draws AD's darkening at half strength and none of the ageing: the
    reconstructions keep part of the AD effect and none of the age effect, in the JSON, the
    CLI's lines and the report's columns."""
    real, recon = [], []
    for i in range(16):
        dx, age = ("AD" if i % 2 else "HC"), 30.0 + 3 * i
        meta = gs.SampleMeta(subject=f"r{i}", modality="T1", diagnosis=dx, age=age)
        real.append((meta, volume(np.random.default_rng(i), dark=(25.0 if dx == "AD" else 0.0) + 0.5 * (age - 30))))
        recon.append((meta, volume(np.random.default_rng(100 + i), dark=12.5 if dx == "AD" else 0.0)))
    gen = [(gs.SampleMeta(subject=f"g{dx}", modality="T1", diagnosis=dx, synthetic=True,
                          request={"stage": "sample", "conditions": {"disease": dx, "modality": "T1"}, "seed": 0}),
            volume(np.random.default_rng(7), dark=10.0 if dx == "AD" else 0.0)) for dx in ("HC", "AD")]
    rp, gp, cp = write_set(tmp_path / "real", real), write_set(tmp_path / "gen", gen), write_set(tmp_path / "recon", recon)
    out = tmp_path / "out"
    assert main(["anatomy", "--spec", str(write_spec(tmp_path / "spec")), "--real", str(rp), "--generated", str(gp),
                 "--recon", str(cp), "--out", str(out), "--no-progress"]) == 0
    assert "% of the real effect" in capsys.readouterr().out
    doc = json.loads((out / "anatomy.json").read_text())
    assert "reconstructed real volumes" in {r["role"] for r in doc["inputs"]}
    ad, age = (doc["results"]["effects"][k] for k in ("diagnosis:HC->AD [T1]", "age:30->70 [T1]"))
    assert ad["recon"]["n_from"] == ad["recon"]["n_to"] == 8
    assert ad["recon_keeps"] == pytest.approx(ad["recon"]["difference"] / ad["real"]["difference"])
    assert 0.3 < ad["recon_keeps"] < 0.9  # not 0.5 exactly: z-scoring over the brain is not linear in the darkening
    assert abs(age["recon_keeps"]) < 0.2 and age["real_confirms"]
    # a perfect decoder (the real volumes as their own reconstructions) keeps all of every effect
    assert main(["anatomy", "--spec", str(tmp_path / "spec" / "anatomy.yaml"), "--real", str(rp), "--generated", str(gp),
                 "--recon", str(rp), "--out", str(tmp_path / "perfect"), "--no-progress"]) == 0
    perfect = json.loads((tmp_path / "perfect" / "anatomy.json").read_text())["results"]["effects"]
    assert perfect["diagnosis:HC->AD [T1]"]["recon_keeps"] == perfect["age:30->70 [T1]"]["recon_keeps"] == 1.0
    # reconstructions of a subset (one visit per subject, say) are held against the real effect on
    # that subset, not on the whole set: a perfect decoder of 10 of the 16 volumes still keeps 100 %
    sub = write_set(tmp_path / "recon-sub", real[:10])
    assert main(["anatomy", "--spec", str(tmp_path / "spec" / "anatomy.yaml"), "--real", str(rp), "--generated", str(gp),
                 "--recon", str(sub), "--out", str(tmp_path / "subset"), "--no-progress"]) == 0
    subset = json.loads((tmp_path / "subset" / "anatomy.json").read_text())["results"]["effects"]["diagnosis:HC->AD [T1]"]
    assert subset["recon"]["n_from"] == subset["recon"]["n_to"] == 5 and subset["recon_keeps"] == 1.0
    assert subset["recon"]["real_difference"] != pytest.approx(ad["real"]["difference"])
    assert perfect["diagnosis:HC->AD [T1]"]["recon"]["slope"] == pytest.approx(1.0)
    assert perfect["diagnosis:HC->AD [T1]"]["recon"]["keeps_interval"] == pytest.approx([1.0, 1.0])
    page = build_report([out], tmp_path / "report").read_text()
    assert "recon keeps" in page and "the decoder draws" in page and "keeps 95 %" in page and "recon slope" in page
    # without --recon, neither the fields nor the columns
    assert main(["anatomy", "--spec", str(tmp_path / "spec" / "anatomy.yaml"), "--real", str(rp), "--generated", str(gp),
                 "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    plain = json.loads((tmp_path / "plain" / "anatomy.json").read_text())["results"]["effects"]["diagnosis:HC->AD [T1]"]
    assert "recon" not in plain and "recon keeps" not in build_report([tmp_path / "plain"], tmp_path / "r2").read_text()


def test_real_and_paired_effects_through_the_cli(tmp_path):
    rng = np.random.default_rng(1)
    real = []
    for i in range(16):  # AD darkens the roi by 25; the roi darkens 0.5 per year of age
        dx = "AD" if i % 2 else "HC"
        age = 30.0 + 3 * i
        real.append((gs.SampleMeta(subject=f"r{i}", modality="T1", diagnosis=dx, age=age),
                     volume(rng, dark=(25.0 if dx == "AD" else 0.0) + 0.5 * (age - 30))))
    for i in range(8):
        idh = "mutant" if i % 2 else "wildtype"
        real.append((gs.SampleMeta(subject=f"t{i}", modality="T1c", idh1=idh, diagnosis="glioma"),
                     volume(rng, lesion=idh, side=i % 3 == 0)))
    gen = []
    for seed in range(5):  # groups 0-3 darken AD; group 4 brightens it (against)
        for dx in ("HC", "AD"):
            dark = {"HC": 0.0, "AD": 20.0 if seed < 4 else -20.0}[dx]
            req = {"stage": "sample", "conditions": {"disease": dx, "modality": "T1"}, "seed": seed}
            gen.append((gs.SampleMeta(subject=f"g{seed}{dx}", modality="T1", diagnosis=dx, synthetic=True, request=req),
                        volume(np.random.default_rng(seed), dark=dark)))
    rp, gp = write_set(tmp_path / "real", real), write_set(tmp_path / "gen", gen)
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec", {**SPEC, "within": "cohort"})  # one cohort ('None'): as pooled
    assert main(["anatomy", "--spec", str(spec), "--real", str(rp), "--generated", str(gp),
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "anatomy.json").read_text())
    assert doc["measurement"] == "anatomy"
    assert {r["role"] for r in doc["inputs"]} == {"anatomy spec", "regions", "real volumes", "generated volumes"}
    ad = doc["results"]["effects"]["diagnosis:HC->AD [T1]"]
    assert ad["real"]["n_from"] == ad["real"]["n_to"] == 8 and ad["real"]["difference"] < 0 and ad["real_confirms"]
    assert ad["real"]["d"] < -2 and ad["real"]["pooled_difference"] == pytest.approx(ad["real"]["difference"])
    p = ad["paired"]
    assert (p["n_groups"], p["n_moved"], p["n_against"]) == (5, 4, 1) and p["p"] == pytest.approx(6 / 32)
    assert ad["of_real"] == pytest.approx(p["mean_change"] / ad["real"]["difference"])
    idh = doc["results"]["effects"]["idh1:wildtype->mutant [T1c]"]
    assert idh["real_confirms"] and idh["real"]["n_from"] == idh["real"]["n_to"] == 4
    assert idh["paired"]["n_groups"] == 0  # no generated T1c
    age = doc["results"]["effects"]["age:30->70 [T1]"]
    assert age["real"]["n"] == 16 and age["real"]["slope"] < 0 and age["real_confirms"]
    assert age["real"]["difference"] == pytest.approx(40 * age["real"]["slope"])
    figs = doc["results"]["figures"]
    assert set(figs) == {"anatomy_0_diagnosis_HC_to_AD"} and (out / figs["anatomy_0_diagnosis_HC_to_AD"]).is_file()
    page = build_report([out], tmp_path / "report").read_text()
    assert "Anatomy of generated samples" in page and "diagnosis:HC-&gt;AD [T1]" in page and "4/5" in page
    assert "AD darkens the roi" in page and "a test world" in page and "&lt;" not in page
    assert "within each cohort" in page


def test_recon_agreement_measures_the_share_and_what_each_volume_keeps():
    """A decoder that keeps half of every volume's departure, plus its own noise: slope about 0.5,
    and a share about 0.5 with a narrow interval when the effect is large. A small effect buried in
    the volumes' spread gives a share whose interval is wide: it is not measured. Strata without both
    classes (cohort C: HC only) do not count, as in the real effect."""
    from g3n_eval.anatomy import Effect, recon_agreement

    e = Effect.model_validate({"field": "diagnosis", "from": "HC", "to": "AD", "signature": "s", "expect": "decrease"})
    rng = np.random.default_rng(0)
    recs = ([{"key": f"a{i}", "cohort": "A", "diagnosis": "HC" if i < 20 else "AD"} for i in range(40)]
            + [{"key": f"c{i}", "cohort": "C", "diagnosis": "HC"} for i in range(10)])
    widths = []
    for effect_size in (-3.0, -0.05):
        x = rng.normal(size=50) + np.array([effect_size * (r["diagnosis"] == "AD") for r in recs])
        x[40:] += 50.0  # cohort C, far off: would drive the slope if it counted
        y = 7.0 + 0.5 * x + rng.normal(scale=0.2, size=50)
        y[40:] = 0.0
        got = recon_agreement(e, (recs, [{"s": v} for v in x]), (recs, [{"s": v} for v in y]), "cohort", reps=300)
        slope, _ = np.polyfit(x[:40], y[:40], 1)  # cohort A's volumes only
        assert got["slope"] == pytest.approx(slope) and got["r"] == pytest.approx(np.corrcoef(x[:40], y[:40])[0, 1])
        assert got["slope"] == pytest.approx(0.5, abs=0.1) and 0.9 < got["r"] < 1.0
        widths.append(got["keeps_interval"][1] - got["keeps_interval"][0])
        if effect_size == -3.0:
            assert got["keeps_interval"][0] < 0.5 < got["keeps_interval"][1]
    assert widths[0] < 0.15 and widths[1] > 1.0
    # the same seed, the same interval
    args = (e, (recs, [{"s": v} for v in x]), (recs, [{"s": v} for v in y]), "cohort")
    assert recon_agreement(*args, reps=50) == recon_agreement(*args, reps=50)


def test_real_effects_within_strata_leave_out_differences_between_cohorts():
    from g3n_eval.anatomy import Effect, real_effect

    e = Effect.model_validate({"field": "diagnosis", "from": "HC", "to": "AD", "signature": "s", "expect": "decrease"})
    recs = ([{"cohort": "A", "diagnosis": "HC"}] * 4 + [{"cohort": "A", "diagnosis": "AD"}] * 2
            + [{"cohort": "B", "diagnosis": "HC"}] * 3 + [{"cohort": "B", "diagnosis": "AD"}] * 3
            + [{"cohort": "C", "diagnosis": "HC"}] * 5)  # C: a scanner 5 units brighter, HC only
    sig = [0, 0.2, -0.2, 0, -1, -1] + [10, 10, 10, 8, 8, 8] + [5] * 5
    within = real_effect(e, recs, sig, "cohort")
    w_a, w_b = 1 / (1 / 4 + 1 / 2), 1 / (1 / 3 + 1 / 3)
    assert within["difference"] == pytest.approx((w_a * -1 + w_b * -2) / (w_a + w_b))
    assert within["strata"] == ["A", "B"] and (within["n_from"], within["n_to"]) == (7, 5)
    assert within["d"] == pytest.approx(within["difference"] / np.sqrt(0.08 / 8))  # only A's HC vary
    pooled = real_effect(e, recs, sig)
    assert pooled["difference"] == pytest.approx(np.mean([-1, -1, 8, 8, 8]) - np.mean(sig[:4] + sig[6:9] + sig[12:]))
    assert pooled["difference"] > within["difference"] + 1  # pooled, the cohorts' scanners hide most of it
    age = Effect.model_validate({"field": "age", "from": 30, "to": 70, "signature": "s", "expect": "increase"})
    recs = [{"cohort": c, "age": float(x)} for c, xs in (("A", (0, 1, 2)), ("B", (10, 11, 12))) for x in xs]
    y = [0, 2, 4, 120, 122, 124]  # slope 2 inside each cohort; B sits 100 higher
    r = real_effect(age, recs, y, "cohort")
    assert r["slope"] == pytest.approx(2.0) and r["difference"] == pytest.approx(80.0) and r["n"] == 6
    assert real_effect(age, recs, y)["slope"] > 9  # pooled, the cohorts' offset reads as age


@pytest.mark.parametrize("within", [None, "cohort"])
def test_effect_maps_agree_with_the_linear_signatures(tmp_path, within):
    """A mean or contrast signature is linear in z, so applied to an effect's map it must give the
    effect's real difference (class means; numbers: slope x change) and its mean paired change."""
    from g3n_eval.anatomy import EffectMaps, effect_figures, evaluate

    a = Anatomy.load(write_spec(tmp_path, {**SPEC, "within": within}))
    rng = np.random.default_rng(3)
    real = [(dict(modality="T1", diagnosis="HC" if i % 3 else "AD", age=20.0 + 7 * i, cohort="AB"[i % 2]),
             volume(rng, dark=2.0 * i + 9.0 * (i % 2))) for i in range(12)]
    gen = [(dict(modality="T1", diagnosis=dx, synthetic=True,
                 request={"seed": s, "conditions": {"disease": dx, "modality": "T1"}}), volume(rng, dark=d))
           for s in range(3) for dx, d in (("HC", 0.0), ("AD", 10.0 * s - 5))]
    maps = EffectMaps(a.spec.effects, within)
    meas = []
    for add, items in ((maps.add_real, real), (maps.add_generated, gen)):
        sigs = []
        for m, v in items:
            z = a.zscore(v)
            add(m, z)
            sigs.append(a.signatures(v, z=z))
        meas.append(([m for m, _ in items], sigs))
    rows = evaluate(a, *meas)["effects"]
    roi, ref = a.masks["roi"], a.masks["ref"]
    for i, name in ((0, "diagnosis:HC->AD [T1]"), (2, "age:30->70 [T1]")):
        real_map, gen_map = maps.maps(i)
        sig = (lambda m: m[roi].mean() - m[ref].mean()) if i == 0 else (lambda m: m[roi].mean())
        assert sig(real_map) == pytest.approx(rows[name]["real"]["difference"], rel=1e-4, abs=1e-6)
        if i == 0:
            assert sig(gen_map) == pytest.approx(rows[name]["paired"]["mean_change"], rel=1e-4)
        else:
            assert gen_map is None  # no generated sample asked for an age
    assert list(effect_figures(a, maps, tmp_path)) == ["anatomy_0_diagnosis_HC_to_AD"]


def test_a_generated_numeric_sweep_pairs_by_seed(tmp_path):
    rng = np.random.default_rng(2)
    real = [(gs.SampleMeta(subject=f"r{i}", modality="T1", age=30.0 + 5 * i), volume(rng, dark=1.0 * i)) for i in range(9)]
    gen = []
    for seed in range(3):
        for age in (30, 50, 70):
            req = {"stage": "sample", "conditions": {"age": age, "modality": "T1"}, "seed": seed}
            gen.append((gs.SampleMeta(subject=f"g{seed}-{age}", modality="T1", age=float(age), synthetic=True, request=req),
                        volume(np.random.default_rng(seed), dark=0.4 * (age - 30))))
    a = Anatomy.load(write_spec(tmp_path / "spec"))
    from g3n_eval.anatomy import evaluate

    meas = [(list(m.model_dump() for m, _ in s), [a.signatures(v) for _, v in s]) for s in (real, gen)]
    row = evaluate(a, meas[0], meas[1])["effects"]["age:30->70 [T1]"]
    assert row["paired"]["n_groups"] == 3 and row["paired"]["n_moved"] == 3  # 30 and 70 of each seed; 50 unused
    assert row["real_confirms"]


@pytest.mark.parametrize("change,message", [
    (lambda s, r: s["signatures"].append({"name": "x", "kind": "contrast", "region": "roi"}), "needs a reference"),
    (lambda s, r: s["effects"].append({**s["effects"][0], "signature": "nope"}), "unknown signature 'nope'"),
    (lambda s, r: s.pop("midline"), "needs the spec's midline"),
    (lambda s, r: r.pop("ref"), r"regions \['ref'\] not in the regions file"),
    (lambda s, r: r.update(roi=np.zeros(SHAPE)), "region 'roi' is empty"),
    (lambda s, r: r.update(ref=np.ones((4, 4, 4))), "3-D arrays of one shape"),
])
def test_bad_specs_name_the_file_and_the_reason(tmp_path, change, message):
    spec, regions = json.loads(json.dumps(SPEC)), dict(REGIONS)
    change(spec, regions)
    path = write_spec(tmp_path, spec, regions)
    with pytest.raises(InputError, match=message) as e:
        Anatomy.load(path)
    assert str(path) in str(e.value)


def test_bad_volumes_are_named(tmp_path):
    a = Anatomy.load(write_spec(tmp_path / "spec"))
    with pytest.raises(InputError, match=r"v1: shape \(4, 4, 4\), the regions are \(16, 12, 10\)"):
        a.signatures(np.zeros((4, 4, 4)), "v1")
    bad = volume(np.random.default_rng(0))
    bad[5, 5, 5] = np.nan
    with pytest.raises(InputError, match="v2: volume contains NaN"):
        a.signatures(bad, "v2")
    # a set on another grid: every volume is rejected, and the command fails naming the set
    rp = write_set(tmp_path / "real", [(gs.SampleMeta(subject="r0", modality="T1"), np.ones((8, 8, 8), np.float32))], (8, 8, 8))
    code = main(["anatomy", "--spec", str(tmp_path / "spec" / "anatomy.yaml"), "--real", str(rp), "--generated", str(rp),
                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "r0-t1" in (tmp_path / "o" / "rejects.jsonl").read_text()
    # one constant volume among good ones: it is recorded, the others are measured
    rng = np.random.default_rng(4)
    items = [(gs.SampleMeta(subject=f"r{i}", modality="T1", diagnosis="HC AD".split()[i % 2]), volume(rng, dark=9.0 * (i % 2)))
             for i in range(4)]
    items.append((gs.SampleMeta(subject="flat", modality="T1", diagnosis="HC"), np.full(SHAPE, 3.0, np.float32)))
    good = write_set(tmp_path / "mixed", items)
    assert main(["anatomy", "--spec", str(tmp_path / "spec" / "anatomy.yaml"), "--real", str(good), "--generated",
                 str(good), "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "o2" / "anatomy.json").read_text())
    assert doc["results"]["rejected"] == 2  # as a real and as a generated volume
    assert doc["results"]["effects"]["diagnosis:HC->AD [T1]"]["real"]["n_from"] == 2
    lines = (tmp_path / "o2" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(x)["key"] for x in lines] == ["real:flat-t1", "generated:flat-t1"]
    assert all("constant inside the brain region" in json.loads(x)["reason"] for x in lines)


def test_forecast_ageing_is_measured_on_the_anatomy_without_a_probe(tmp_path):
    """Forecasts whose roi darkens with the interval (the spec's age effect: decrease) move in every
    baseline, at the rate real follow-ups show; forecasts that only add noise do not; a T1c baseline
    is not measured by a T1 effect; a spec with no age effect is refused, naming it."""
    from g3n_eval.forecast import anatomy_ageing

    a = Anatomy.load(write_spec(tmp_path / "spec"))
    rng = np.random.default_rng(3)
    rate = 2.0  # roi intensity lost per year (of a 100-unit brain, noise sd 5)
    bases = [volume(rng) for _ in range(6)]
    metas = [{"modality": "T1"}] * 5 + [{"modality": "T1c"}]
    # the last two baselines are a real follow-up pair: the same brain 4 years later
    bases[4] = bases[3].copy()
    bases[4][4:7, 4:7, 3:6] -= 4 * rate
    intervals = (2.0, 5.0, 10.0)
    pairs, ageing, still = [], [], []
    for b in (0, 1, 2, 3, 5):
        for dt in intervals:
            v = bases[b].copy()
            v[4:7, 4:7, 3:6] -= rate * dt
            pairs.append((len(ageing), b, dt))
            ageing.append(v)
            still.append(bases[b] + rng.normal(0, 1.0, SHAPE).astype(np.float32))
    keys = [f"b{i}" for i in range(len(bases))]
    out = anatomy_ageing(a, ageing, bases, pairs, keys, metas, followups=[(3, 4, 4.0)])
    r = out["age:30->70 [T1]"]
    assert r["signature"] == "roi_signal" and r["expect"] == "decrease"
    assert r["n"] == 12  # 4 T1 baselines x 3 intervals; the T1c baseline is left out
    assert r["paired"]["n_groups"] == 4 and r["paired"]["n_moved"] == 4
    assert r["slope"] > 0  # signed: the expected direction is positive
    assert r["real_followups"]["n"] == 1 and r["real_followups"]["n_moved"] == 1
    # the forecasts age at the real rate (z-scoring over the brain makes the signature slightly
    # sublinear in the darkening, so the 2-10 y slope is a little below the 4 y pair's rate)
    assert 0.75 < r["recovered"] < 1.05
    flat = anatomy_ageing(a, still, bases, pairs, keys, metas)["age:30->70 [T1]"]
    assert abs(flat["slope"]) < 0.1 * r["slope"] and "real_followups" not in flat
    no_age = {**SPEC, "effects": [e for e in SPEC["effects"] if e["field"] != "age"]}
    with pytest.raises(InputError, match="anatomy.yaml: has no numeric age effect"):
        anatomy_ageing(Anatomy.load(write_spec(tmp_path / "no-age", no_age)), ageing, bases, pairs, keys, metas)
