import math

import numpy as np
import pytest
from g3n_eval.controllability import ClassTask, class_controllability, evaluate, value_sweep
from g3n_eval.forecast import ageing_recovery, difference_map
from g3n_eval.stats import auc_binary, line_fit


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


def test_forecast_recovery_and_map():
    dt = [1, 1, 2, 2, 4, 4]
    base = [70, 60, 70, 60, 70, 60]
    fc = [b + 0.3 * t for b, t in zip(base, dt)]
    r = ageing_recovery(dt, base, fc)
    assert r["slope"] == pytest.approx(0.3) and r["pearson_r"] == pytest.approx(1.0)
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
