import math

import numpy as np
import pytest
from g3n_eval.controllability import (
    ClassTask,
    class_controllability,
    evaluate,
    paired_shifts,
    paired_sweep,
    pairing_key,
    real_slice,
    value_sweep,
)
from g3n_eval.forecast import ageing_recovery, difference_map
from g3n_eval.stats import auc_binary, line_fit, sign_test


def test_auc_binary_known_values():
    assert auc_binary([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc_binary([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc_binary([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc_binary([1, 1], [0.1, 0.2]))


def test_line_fit():
    f = line_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert f["slope"] == pytest.approx(2) and f["intercept"] == pytest.approx(1) and f["pearson_r"] == pytest.approx(1)
    assert math.isnan(line_fit([1, 1], [2, 3])["slope"])


def test_task_parse():
    t = ClassTask.parse("diagnosis:HC,AD")
    assert t.field == "diagnosis" and t.classes == ("HC", "AD") and t.name == "diagnosis:HC-vs-AD"
    with pytest.raises(ValueError):
        ClassTask.parse("diagnosis:HC")


def test_class_controllability_columns():
    classes = ["HC", "AD"]
    requested = ["HC"] * 4 + ["AD"] * 4 + [None] * 5
    # probe agrees with 3 of 4 HC requests and all AD requests; null samples look like HC
    p_ad = [0.1, 0.2, 0.3, 0.7, 0.9, 0.8, 0.95, 0.6, 0.1, 0.2, 0.3, 0.2, 0.9]
    proba = np.stack([1 - np.array(p_ad), p_ad], axis=1)
    row = class_controllability(classes, requested, proba, real_labels=["HC"] * 9 + ["AD"] * 3,
                                real_cv_pred=["HC"] * 9 + ["AD", "AD", "HC"], real_cv_proba=np.full((12, 2), 0.5))
    assert row["cond"]["n"] == 8 and row["cond"]["agreement"] == pytest.approx(7 / 8)
    assert row["cond"]["auc"] == pytest.approx(15 / 16)  # one HC sample (0.7) above one AD (0.6)
    assert row["cond"]["per_class"]["HC"]["agreement"] == pytest.approx(0.75)
    assert row["null"]["class"] == "HC" and row["null"]["fraction"] == pytest.approx(4 / 5)
    assert row["prior"]["class"] == "HC" and row["prior"]["fraction"] == pytest.approx(0.75)
    assert row["real"]["agreement"] == pytest.approx(11 / 12)


def test_value_sweep():
    req = [30] * 3 + [50] * 3 + [70] * 3
    pred = [31, 29, 33, 48, 50, 52, 69, 73, 71]
    s = value_sweep(req, pred)
    assert s["levels"]["30"]["mean"] == pytest.approx(31) and s["levels"]["70"]["mean"] == pytest.approx(71)
    assert s["slope"] == pytest.approx(1.0, abs=0.05) and s["pearson_r"] > 0.99


def test_evaluate_with_g3n_probe():
    """A probe fitted on real features scores generated ones: a generator that obeys the request
    (features shifted like the real class) scores high; one that ignores it scores at chance."""
    from g3n_probe import from_arrays, protocol_preset

    rng = np.random.default_rng(0)
    d = 6
    centre = {"HC": np.zeros(d), "AD": np.full(d, 2.0)}
    recs, X = [], []
    for i in range(40):
        dx = "HC" if i % 2 else "AD"
        recs.append({"key": f"r{i:03d}", "subject": f"s{i}", "modality": "T1", "diagnosis": dx, "age": 30.0 + i})
        X.append(np.r_[centre[dx] + rng.normal(0, 0.5, d), (30.0 + i) / 10 + rng.normal(0, 0.05)])
    real = from_arrays(np.array(X), recs)
    grecs, G = [], []
    for i in range(24):
        dx = ["HC", "AD", None][i % 3]
        grecs.append({"key": f"g{i:03d}", "subject": f"g{i}", "modality": "T1", "diagnosis": dx, "age": [30.0, 50.0, 70.0][i % 3],
                      "synthetic": True})
        base = centre[dx] if dx else centre["HC"]
        G.append(np.r_[base + rng.normal(0, 0.5, d), grecs[-1]["age"] / 10 + rng.normal(0, 0.05)])
    gen = from_arrays(np.array(G), grecs)
    out = evaluate(real, gen, [ClassTask.parse("diagnosis:HC,AD"), ClassTask.parse("diagnosis:HC,PD")], sweeps=["age"],
                   protocol=protocol_preset("paper", threads=1), n_splits=3)
    row = out["tasks"]["diagnosis:HC-vs-AD"]
    assert row["cond"]["agreement"] >= 0.9 and row["cond"]["auc"] >= 0.9
    assert row["null"]["class"] == "HC"
    assert row["real"]["agreement"] >= 0.9
    assert "diagnosis:HC-vs-PD" in out["skipped"]
    assert out["sweeps"]["age"]["slope"] > 0.5 and out["sweeps"]["age"]["pearson_r"] > 0.8


def test_probes_are_fitted_on_the_contrast_the_samples_asked_for():
    """Generated T1 samples are scored by a probe fitted on the real T1 volumes only. The real T2
    volumes here are all HC and sit where T1 AD does on the disease feature: a probe fitted on every
    contrast takes part of that feature for HC and calls some T1 samples asked for AD HC."""
    from g3n_probe import from_arrays, protocol_preset

    rng = np.random.default_rng(1)
    recs, X = [], []
    for i in range(60):
        mod, dx = ("T1", "AD" if i % 2 else "HC") if i < 40 else ("T2", "HC")
        recs.append({"key": f"r{i:03d}", "subject": f"s{i}", "modality": mod, "diagnosis": dx, "age": 40.0 + i % 30})
        shift = 1.5 if dx == "AD" or mod == "T2" else 0.0
        X.append([shift + rng.normal(0, 0.3), (3.0 if mod == "T2" else 0.0) + rng.normal(0, 0.3),
                  (40.0 + i % 30) / 10 + rng.normal(0, 0.05)])
    real = from_arrays(np.array(X), recs)
    grecs, G = [], []
    for i in range(16):
        dx = "AD" if i % 2 else "HC"
        grecs.append({"key": f"g{i:03d}", "subject": f"g{i}", "modality": "T1", "diagnosis": dx, "age": 50.0,
                      "synthetic": True, "request": {"seed": i // 2, "conditions": {"disease": dx, "modality": "T1"}}})
        G.append([(1.5 if dx == "AD" else 0.0) + rng.normal(0, 0.3), rng.normal(0, 0.3), 5.0])
    gen = from_arrays(np.array(G), grecs)
    assert real_slice(grecs, "diagnosis", ("HC", "AD")) == {"modality": "T1"}
    assert real_slice(grecs, "modality", ("T1", "T2")) == {}  # a task never slices on its own field
    proto = protocol_preset("paper", threads=1)
    task = [ClassTask.parse("diagnosis:HC,AD")]
    row = evaluate(real, gen, task, ["age"], protocol=proto, n_splits=3)
    assert row["tasks"]["diagnosis:HC-vs-AD"]["real_slice"] == {"modality": "T1"}
    assert row["tasks"]["diagnosis:HC-vs-AD"]["real"]["n"] == 40
    assert row["sweeps"]["age"]["real_slice"] == {"modality": "T1"}
    assert row["tasks"]["diagnosis:HC-vs-AD"]["paired"]["n_moved"] == 8
    every = evaluate(real, gen, task, protocol=proto, n_splits=3, match=())
    assert every["tasks"]["diagnosis:HC-vs-AD"]["cond"]["agreement"] < row["tasks"]["diagnosis:HC-vs-AD"]["cond"]["agreement"] == 1.0
    assert every["tasks"]["diagnosis:HC-vs-AD"]["real_slice"] == {}
    assert every["tasks"]["diagnosis:HC-vs-AD"]["real"]["n"] == 60
    # asked for T2, where the real data hold no AD: the probe falls back to every real volume
    t2 = [{**r, "modality": "T2", "request": {**r["request"], "conditions": {**r["request"]["conditions"], "modality": "T2"}}}
          for r in grecs]
    fallback = evaluate(real, from_arrays(np.array(G), t2), task, protocol=proto, n_splits=3)
    assert fallback["tasks"]["diagnosis:HC-vs-AD"]["real_slice"] == {}
    assert fallback["tasks"]["diagnosis:HC-vs-AD"]["real"]["n"] == 60


def test_sign_test():
    assert sign_test(8, 0) == pytest.approx(1 / 256)
    assert sign_test(7, 1) == pytest.approx(9 / 256)
    assert sign_test(0, 3) == pytest.approx(1.0)
    assert math.isnan(sign_test(0, 0))


def _gen(conditions: dict, seed: int, **fields) -> dict:
    return {"synthetic": True, **fields, "request": {"seed": seed, "conditions": conditions}}


def test_pairing_key_drops_the_task_condition_only():
    hc = _gen({"disease": "HC", "modality": "T1"}, 5, diagnosis="HC", modality="T1")
    ad = _gen({"disease": "AD", "modality": "T1"}, 5, diagnosis="AD", modality="T1")
    assert pairing_key(hc, "diagnosis") == pairing_key(ad, "diagnosis") == (5, ("modality", "T1"))
    assert pairing_key(hc, "diagnosis") != pairing_key({**ad, "request": {**ad["request"], "seed": 6}}, "diagnosis")
    old = _gen({"age": 70, "modality": "T1"}, 5, age=70.0, modality="T1")  # the record holds a float, the request an int
    assert pairing_key(old, "age") == (5, ("modality", "T1"))
    assert pairing_key({"diagnosis": "HC"}, "diagnosis") is None  # real samples have no seed


def test_paired_shifts_see_a_small_effect_that_unpaired_samples_hide():
    """Noise that moves the probe a lot plus a request effect of +0.05: the unpaired AUC is near
    chance, the paired column finds every group moved."""
    rng = np.random.default_rng(0)
    noise = rng.uniform(0.2, 0.8, 8)
    requested = ["HC"] * 8 + ["AD"] * 8
    keys = [(s,) for s in range(8)] * 2
    p_ad = np.r_[noise, noise + 0.05]
    proba = np.stack([1 - p_ad, p_ad], axis=1)
    assert class_controllability(["HC", "AD"], requested, proba)["cond"]["auc"] < 0.7
    out = paired_shifts(["HC", "AD"], requested, keys, proba)
    assert out["n_groups"] == 8 and out["n_moved"] == 8 and out["moved"] == 1.0
    assert out["mean_shift"] == pytest.approx(0.05) and out["p"] == pytest.approx(1 / 256)
    against = paired_shifts(["HC", "AD"], requested[::-1], keys, proba)  # asked the other way round
    assert against["n_against"] == 8 and against["p"] == pytest.approx(1.0)
    unpaired = paired_shifts(["HC", "AD"], requested, [(s,) for s in range(16)], proba)
    assert unpaired["n_groups"] == 0 and math.isnan(unpaired["p"])


def test_paired_shifts_four_classes_and_a_sweep():
    classes = ["T1", "T2", "FLAIR", "T1c"]
    requested = classes * 3
    keys = [(s,) for s in range(3) for _ in classes]
    proba = np.tile(np.eye(4) * 0.7 + 0.075, (3, 1))  # each sample looks like what it asked for
    out = paired_shifts(classes, requested, keys, proba)
    assert out["n_groups"] == 3 and out["n_moved"] == 3 and out["mean_shift"] == pytest.approx(0.7)
    req = [30, 50, 70] * 4
    pred = [60 + 0.5 * r + 10 * s for s in range(4) for r in (30, 50, 70)]  # offset per seed, slope 0.5 within
    sw = paired_sweep(req, pred, [(s,) for s in range(4) for _ in range(3)])
    assert sw["n_groups"] == 4 and sw["n_moved"] == 4 and sw["mean_slope"] == pytest.approx(0.5)


def test_forecast_recovery_and_map():
    dt = [1, 1, 2, 2, 4, 4]
    base = [70, 60, 70, 60, 70, 60]
    fc = [b + 0.3 * t for b, t in zip(base, dt)]
    r = ageing_recovery(dt, base, fc)
    assert r["slope"] == pytest.approx(0.3) and r["pearson_r"] == pytest.approx(1.0) and "paired" not in r
    # paired by baseline: subject "a" ages with the interval, "b" grows younger; the pooled line hides which
    subj = ["a", "b", "a", "b", "a", "b"]
    fc2 = [b + (0.3 if s == "a" else -0.1) * t for b, t, s in zip(base, dt, subj)]
    p = ageing_recovery(dt, base, fc2, subj)["paired"]
    assert (p["n_groups"], p["n_moved"], p["n_against"]) == (2, 1, 1) and p["mean_slope"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="6 intervals but 2 baselines"):
        ageing_recovery(dt, base, fc2, ["a", "b"])
    b = [np.zeros((4, 4, 4)), np.ones((4, 4, 4))]
    f = [np.zeros((4, 4, 4)), np.ones((4, 4, 4))]
    f[0][1, 1, 1] = 2.0
    f[1][1, 1, 1] = -1.0  # change -2
    m = difference_map(f, b)
    assert m["mean"][1, 1, 1] == pytest.approx(0.0) and m["mean_abs"][1, 1, 1] == pytest.approx(2.0)
    assert m["mean_abs"].sum() == pytest.approx(2.0)


def test_cv_predictions_survive_a_fold_with_one_training_class():
    """Grouped folds on a tiny cohort can leave one class in a training part: no crash."""
    import numpy as np
    from g3n_probe import protocol_preset

    from g3n_eval.controllability import cv_predictions

    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 4))
    y = ["HC", "HC", "HC", "HC", "AD", "AD"]
    groups = ["s0", "s1", "s2", "s3", "s4", "s4"]  # both AD volumes are one subject: one fold trains on HC only
    pred, proba, classes = cv_predictions(X, y, groups, protocol_preset("tiny"), 2)
    assert classes == ["AD", "HC"] and proba.shape == (6, 2) and len(pred) == 6


def test_real_column_permutation_test_tells_a_seeing_probe_from_a_blind_one():
    """The real column's probe is tested against shuffled labellings: a probe fitted on features
    that carry the class beats every shuffle (smallest p); one fitted on noise does not, and its
    row is flagged blind even where its AUC happens to look fine. Serial and process runs agree."""
    from g3n_probe import from_arrays, protocol_preset

    from g3n_eval.controllability import BLIND_P, is_blind, real_null

    rng = np.random.default_rng(3)
    recs, X = [], []
    for i in range(24):
        dx = "AD" if i % 2 else "HC"
        sex = "M" if (i // 2) % 2 else "F"
        recs.append({"key": f"r{i:03d}", "subject": f"s{i}", "modality": "T1", "diagnosis": dx, "sex": sex})
        X.append([(1.5 if dx == "AD" else 0.0) + rng.normal(0, 0.5), rng.normal(0, 1.0), rng.normal(0, 1.0)])
    real = from_arrays(np.array(X), recs)
    grecs = [{"key": f"g{i}", "subject": f"g{i}", "modality": "T1", "diagnosis": ("HC", "AD")[i % 2],
              "sex": ("F", "M")[i % 2], "synthetic": True} for i in range(8)]
    gen = from_arrays(rng.normal(size=(8, 3)), grecs)
    proto = protocol_preset("paper", threads=1, n_jobs=1)
    tasks = [ClassTask.parse("diagnosis:HC,AD"), ClassTask.parse("sex:F,M")]
    out = evaluate(real, gen, tasks, protocol=proto, n_splits=3, permutations=19)
    seeing, noise = out["tasks"]["diagnosis:HC-vs-AD"]["real"], out["tasks"]["sex:F-vs-M"]["real"]
    assert seeing["permutation"] == {"permutations": 19, "p": 0.05, "null95": pytest.approx(seeing["permutation"]["null95"])}
    assert seeing["auc"] > seeing["permutation"]["null95"] and not seeing["blind"]
    assert noise["permutation"]["p"] > BLIND_P and noise["blind"]
    # the same test again gives the same shuffles; processes give the same AUCs as one process
    again = evaluate(real, gen, tasks, protocol=proto, n_splits=3, permutations=19)
    assert again["tasks"]["sex:F-vs-M"]["real"]["permutation"] == noise["permutation"]
    y = [r["sex"] for r in recs]
    groups = [r["subject"] for r in recs]
    serial = real_null(real.X, y, groups, proto, 3, ["F", "M"], 6, seed=7)
    parallel = real_null(real.X, y, groups, proto.model_copy(update={"n_jobs": 2}), 3, ["F", "M"], 6, seed=7)
    assert serial == parallel and len(set(serial)) > 1
    # without the test the AUC rule decides; without a real column nothing is blind
    assert is_blind({"auc": 0.5}) and not is_blind({"auc": 0.8}) and not is_blind(None)
    assert is_blind({"auc": 0.8, "permutation": {"p": 0.2}}) and not is_blind({"auc": 0.5, "permutation": {"p": 0.01}})
    # a row fitted on more subjects than the limit skips the test: the AUC rule decides
    capped = evaluate(real, gen, tasks, protocol=proto, n_splits=3, permutations=19, permutation_max_subjects=20)
    row = capped["tasks"]["diagnosis:HC-vs-AD"]["real"]
    assert "permutation" not in row and row["permutation_skipped"].startswith("24 subjects > 20") and not row["blind"]
    with pytest.raises(ValueError, match="permutations must be >= 0"):
        evaluate(real, gen, tasks, protocol=proto, n_splits=3, permutations=-1)


def test_recon_column_tells_whether_the_probe_still_sees_its_task_on_reconstructions():
    """Each real-fitted fold probe scores the reconstructions of the volumes it held out: a
    reconstruction identical to its volume gives exactly the real column; one that keeps the class
    gives a sighted recon column; one that loses it (the tokenizer's blur) a blind one, while the
    real column still sees the task. The age sweep's probe is checked the same way."""
    from g3n_probe import from_arrays, protocol_preset

    rng = np.random.default_rng(5)
    recs, X = [], []
    for i in range(24):
        dx = "AD" if i % 2 else "HC"
        age = 40.0 + 2 * i
        recs.append({"key": f"r{i:03d}", "subject": f"s{i}", "modality": "T1", "diagnosis": dx, "age": age})
        X.append([(1.5 if dx == "AD" else 0.0) + rng.normal(0, 0.4), age / 20 + rng.normal(0, 0.2), rng.normal(0, 1.0)])
    X = np.array(X)
    real = from_arrays(X, recs)
    grecs = [{"key": f"g{i}", "subject": f"g{i}", "modality": "T1", "diagnosis": ("HC", "AD")[i % 2],
              "age": (30, 70)[i % 2], "synthetic": True} for i in range(8)]
    gen = from_arrays(rng.normal(size=(8, 3)), grecs)
    proto = protocol_preset("paper", threads=1, n_jobs=1)
    tasks = [ClassTask.parse("diagnosis:HC,AD")]

    def run(recon_X, keys=None):
        recon = from_arrays(recon_X, recs, keys=keys or [r["key"] for r in recs])
        return evaluate(real, gen, tasks, ["age"], proto, n_splits=3, permutations=19, recon=recon)

    same = run(X.copy())
    row = same["tasks"]["diagnosis:HC-vs-AD"]
    assert row["recon"]["n"] == 24 and row["recon"]["auc"] == pytest.approx(row["real"]["auc"])
    assert row["recon"]["permutation"]["p"] == pytest.approx(0.05) and not row["recon"]["blind"]
    sweep = same["sweeps"]["age"]["recon"]
    assert sweep["recon"]["slope"] == pytest.approx(sweep["real"]["slope"]) and sweep["real"]["pearson_r"] > 0.9
    blurred = X.copy()
    blurred[:, 0] = blurred[:, 0].mean() + rng.normal(0, 0.01, size=24)  # the class's feature lost in the decoder
    blurred[:, 1] = blurred[:, 1].mean() + rng.normal(0, 0.01, size=24)  # and the age's
    lost = run(blurred)
    row = lost["tasks"]["diagnosis:HC-vs-AD"]
    assert not row["real"]["blind"] and row["recon"]["blind"] and row["recon"]["permutation"]["p"] > 0.05
    sweep = lost["sweeps"]["age"]["recon"]
    assert abs(sweep["recon"]["slope"]) < 0.2 < sweep["real"]["slope"]
    # reconstructions of other volumes are matched to none: nothing to score
    other = run(X.copy(), keys=[f"x{i}" for i in range(24)])
    assert other["tasks"]["diagnosis:HC-vs-AD"]["recon"]["n"] == 0 and other["tasks"]["diagnosis:HC-vs-AD"]["recon"]["blind"]
    # without recon, no recon columns
    plain = evaluate(real, gen, tasks, ["age"], proto, n_splits=3)
    assert "recon" not in plain["tasks"]["diagnosis:HC-vs-AD"] and "recon" not in plain["sweeps"]["age"]


def test_followup_pairs_and_what_the_probe_sees_of_real_ageing():
    """Real follow-up pairs: first session to each later one, per subject and modality, ages known,
    generated samples and other modalities left out; a probe that predicts every later session older
    sees real ageing, one that predicts at random does not and the forecast row is blind."""
    from g3n_eval.forecast import followup_ageing, followup_pairs

    metas = [{"subject": "a", "modality": "T1", "age": 70.0}, {"subject": "a", "modality": "T1", "age": 72.5},
             {"subject": "a", "modality": "T1", "age": 71.0}, {"subject": "a", "modality": "T2", "age": 72.5},
             {"subject": "b", "modality": "T1", "age": 60.0}, {"subject": "c", "modality": "T1", "age": None},
             {"subject": "c", "modality": "T1", "age": 61.0}, {"subject": "s", "modality": "T1", "age": 50.0, "request": {"stage": "sample"}},
             {"subject": "s", "modality": "T1", "age": 55.0, "request": {"stage": "sample"}}]
    keys = [f"k{i}" for i in range(len(metas))]
    assert followup_pairs(keys, metas, {"T1"}) == [("k0", "k2", 1.0), ("k0", "k1", 2.5)]
    assert followup_pairs(keys, metas) == [("k0", "k2", 1.0), ("k0", "k1", 2.5)]  # T2 has one session only
    sees = followup_ageing([1.0] * 8, [60.0] * 8, [60.5] * 8)
    assert sees["n_older"] == 8 and sees["p"] == pytest.approx(1 / 256) and not sees["blind"]
    assert sees["recovered"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    noise = followup_ageing([2.0] * 8, [60.0] * 8, list(60.0 + rng.normal(0, 5, 8)))
    assert noise["n_older"] + noise["n_younger"] == 8 and noise["blind"]
