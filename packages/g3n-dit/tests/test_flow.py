"""Interpolant, guidance formula, condition dropout, sampler determinism, bridge, counterfactual."""

from __future__ import annotations

import pytest
import torch

from dit_testutil import perturb, tiny_model_config, toy_conditions
from g3n_dit.bridge import bridge_point, forecast, gamma
from g3n_dit.conditions import ConditionError, drop_conditions, encode
from g3n_dit.config import BridgeConfig
from g3n_dit.counterfactual import apply_changes, counterfactual
from g3n_dit.flow import (
    guided_velocity,
    initial_noise,
    interpolate,
    mask_to,
    resolve_precision,
    resolve_scales,
    sample,
    sample_times,
)
from g3n_dit.model import DiT

REQ = {"disease": "AD", "sex": "M", "modality": "T2", "age": 72.0}


def _model(**kw):
    torch.manual_seed(0)
    return perturb(DiT(tiny_model_config(**kw), toy_conditions())).eval()


def test_training_times_uniform_and_logit_normal():
    u = sample_times(20000, torch.Generator().manual_seed(0))
    ln = sample_times(20000, torch.Generator().manual_seed(0), "logit_normal")
    assert torch.equal(ln, sample_times(20000, torch.Generator().manual_seed(0), "logit_normal"))
    for t in (u, ln):
        assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert abs(middle(u) - 0.5) < 0.02 and abs(middle(ln) - 0.728) < 0.02  # P(|N(0,1)| < ln 3)
    late = sample_times(20000, torch.Generator().manual_seed(0), "logit_normal", mean=1.0, std=0.5)
    assert abs(late.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02
    with pytest.raises(ValueError, match="cosine"):
        sample_times(4, torch.Generator(), "cosine")


def test_auto_precision_is_bf16_only_where_it_is_fast(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_precision("auto", cpu) == "bf16"
    # told to behave as an AVX2-only CPU, the AMX kernels are off: bf16 would be emulated
    for var, value in (("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2")):
        monkeypatch.setenv(var, value)
        assert resolve_precision("auto", cpu) == "fp32", var
        monkeypatch.delenv(var)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)  # an older torch
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_interpolant_endpoints_and_target():
    x0, x1 = torch.randn(3, 64, 4), torch.randn(3, 64, 4)
    xt, v = interpolate(x0, x1, torch.tensor([0.0, 1.0, 0.25]))
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[1], x1[1])
    assert torch.allclose(xt[2], 0.75 * x0[2] + 0.25 * x1[2])
    assert torch.allclose(v, x1 - x0)


def test_guidance_w0_is_unconditional_and_w1_is_conditional():
    conds = toy_conditions()
    m = _model()
    x, t = torch.randn(2, 64, 4), torch.full((2,), 0.4)
    cond = encode(conds, [REQ, REQ])
    with torch.no_grad():
        v_full = m(x, t, cond)
        v_uncond = m(x, t, mask_to(cond, {"modality"}))  # modality is always on (never dropped)
        v_w0 = guided_velocity(m, conds, x, t, cond, resolve_scales(conds, 0.0))
        v_w1 = guided_velocity(m, conds, x, t, cond, resolve_scales(conds, 1.0))
        v_w15 = guided_velocity(m, conds, x, t, cond, resolve_scales(conds, 1.5))
        # per-condition scales: chain formula v0 + sum_k w_k (v_k - v_{k-1}) over disease, sex, age
        w = {"disease": 2.0, "sex": 0.5, "modality": 7.0, "age": 1.0}
        v_mixed = guided_velocity(m, conds, x, t, cond, w)
        v1 = m(x, t, mask_to(cond, {"modality", "disease"}))
        v2 = m(x, t, mask_to(cond, {"modality", "disease", "sex"}))
    assert torch.allclose(v_w0, v_uncond, atol=1e-5)
    assert torch.allclose(v_w1, v_full, atol=1e-5)
    assert not torch.allclose(v_full, v_uncond, atol=1e-3)
    assert torch.allclose(v_w15, v_uncond + 1.5 * (v_full - v_uncond), atol=1e-5)
    expect = v_uncond + 2.0 * (v1 - v_uncond) + 0.5 * (v2 - v1) + 1.0 * (v_full - v2)
    assert torch.allclose(v_mixed, expect, atol=1e-5)


def test_always_on_condition_cannot_be_guided():
    with pytest.raises(ValueError, match="modality"):
        resolve_scales(toy_conditions(), 1.5, {"modality": 2.0})
    with pytest.raises(ValueError, match="unknown"):
        resolve_scales(toy_conditions(), 1.5, {"nope": 2.0})


def test_guidance_unrequested_condition_is_null():
    conds = toy_conditions()
    m = _model()
    x, t = torch.randn(1, 64, 4), torch.full((1,), 0.4)
    cond = encode(conds, [{"modality": "T1", "sex": "F"}])
    with torch.no_grad():
        v = guided_velocity(m, conds, x, t, cond, resolve_scales(conds, 1.0))
        assert torch.allclose(v, m(x, t, cond), atol=1e-6)


def test_dropout_rates_are_honoured():
    conds = toy_conditions()  # drop 0.1 everywhere except modality (0.0)
    n = 20000
    cond = encode(conds, [REQ] * n)
    g = torch.Generator().manual_seed(0)
    out = drop_conditions(conds, cond, g)
    for c in conds:
        rate = 1 - out[c.name][1].float().mean().item()
        assert abs(rate - c.spec.drop_prob) < 0.01, (c.name, rate)
    assert out["modality"][1].all()
    # drops are independent across conditions: P(both dropped) ~ 0.01
    both = (~out["disease"][1] & ~out["sex"][1]).float().mean().item()
    assert abs(both - 0.01) < 0.004
    # an already-missing label stays missing
    cond2 = encode(conds, [{"modality": "T1"}] * 10)
    assert not drop_conditions(conds, cond2, g)["disease"][1].any()


def test_unknown_label_and_unknown_condition_are_refused():
    conds = toy_conditions()
    with pytest.raises(ConditionError, match="'disease'.*'XX'"):
        encode(conds, [{"disease": "XX"}])
    with pytest.raises(ConditionError, match="unknown condition"):
        encode(conds, [{"diseas": "AD"}])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampling_is_deterministic_per_seed(method):
    conds = toy_conditions()
    m = _model()
    cond = encode(conds, [REQ] * 3)
    scales = resolve_scales(conds, 1.5)
    a = sample(m, conds, cond, initial_noise([1, 2, 3], (64, 4)), scales, steps=4, method=method)
    b = sample(m, conds, cond, initial_noise([1, 2, 3], (64, 4)), scales, steps=4, method=method)
    assert torch.equal(a, b)
    # a sample depends on its own seed only, not on its batch neighbours
    c = sample(m, conds, encode(conds, [REQ]), initial_noise([2], (64, 4)), scales, steps=4, method=method)
    assert torch.allclose(c[0], a[1], atol=1e-5)
    d = sample(m, conds, encode(conds, [REQ]), initial_noise([9], (64, 4)), scales, steps=4, method=method)
    assert not torch.allclose(d[0], a[1])


def test_bridge_passes_through_both_endpoints():
    xb, xf, z = torch.randn(2, 64, 4), torch.randn(2, 64, 4), torch.randn(2, 64, 4)
    t = torch.tensor([0.0, 1.0])
    pts = bridge_point(xb, xf, t, z, sigma=0.7)
    assert torch.equal(pts[0], xb[0]) and torch.allclose(pts[1], xf[1])
    assert gamma(torch.tensor(0.0), 0.7) == 0 and gamma(torch.tensor(1.0), 0.7) == 0
    assert gamma(torch.tensor(0.5), 0.7) == pytest.approx(0.35)
    mid = bridge_point(xb, xf, torch.tensor([0.5, 0.5]), z, sigma=0.7)
    assert torch.allclose(mid, 0.5 * xb + 0.5 * xf + 0.35 * z)


def _bridge_model():
    """A perturbed tiny bridge network with the longitudinal conditions, and those conditions."""
    from g3n_dit.conditions import resolve_conditions
    from g3n_dit.config import default_longitudinal_conditions

    specs = default_longitudinal_conditions()
    for s in specs:
        if s.kind == "categorical":
            s.vocab = {"diagnosis": ["HC", "MCI", "AD"], "sex": ["F", "M"], "cdr": ["0", "0.5", "1"]}[s.name]
    conds = resolve_conditions(specs)
    torch.manual_seed(0)
    return perturb(DiT(tiny_model_config(context_channels=4), conds)).eval(), conds


def test_forecast_is_deterministic_and_starts_at_baseline():
    m, conds = _bridge_model()
    xb = torch.randn(2, 64, 4)
    cond = encode(conds, [{"diagnosis": "AD", "sex": "F", "age": 70, "cdr": 0.5, "interval": 2.0}] * 2)
    scales = resolve_scales(conds, 1.0)
    a = forecast(m, conds, xb, cond, scales, BridgeConfig(), steps=5)
    b = forecast(m, conds, xb, cond, scales, BridgeConfig(), steps=5)
    assert torch.equal(a, b)
    z = forecast(m, conds, xb, cond, scales, BridgeConfig(), steps=0)
    assert torch.equal(z, xb)
    cond4 = encode(conds, [{"diagnosis": "AD", "sex": "F", "age": 70, "cdr": 0.5, "interval": 4.0}] * 2)
    assert not torch.allclose(forecast(m, conds, xb, cond4, scales, BridgeConfig(), steps=5), a)


def test_per_year_forecast_is_the_interval_times_the_network():
    m, conds = _bridge_model()
    xb = torch.randn(3, 64, 4)
    recs = [{"diagnosis": "AD", "sex": "F", "age": 70, "cdr": 0.5, "interval": dt} for dt in (0.0, 2.5, -4.0)]
    cond = encode(conds, recs)
    scales = resolve_scales(conds, 1.0)
    per_year, free = BridgeConfig(per_year=True), BridgeConfig()
    # one Euler step from the baseline: x = x_base + v(x_base, 0); per_year scales v by the interval
    one = forecast(m, conds, xb, cond, scales, per_year, steps=1) - xb
    ref = forecast(m, conds, xb, cond, scales, free, steps=1) - xb
    assert torch.equal(one[0], torch.zeros_like(one[0]))  # nothing happens in no time
    assert torch.allclose(one[1], 2.5 * ref[1], atol=1e-6) and torch.allclose(one[2], -4.0 * ref[2], atol=1e-6)
    assert torch.equal(forecast(m, conds, xb, cond, scales, per_year, steps=5)[0], xb[0])
    with pytest.raises(ValueError, match="interval"):
        forecast(m, conds, xb, {k: v for k, v in cond.items() if k != "interval"}, scales, per_year, steps=1)


def test_segmented_forecast_chains_segments_with_the_age_moved_on():
    m, conds = _bridge_model()
    xb = torch.randn(2, 64, 4)
    req = {"diagnosis": "MCI", "sex": "M", "age": 70, "cdr": 0.5}
    cond = encode(conds, [{**req, "interval": 9.0}, {**req, "interval": 2.0}])
    scales = resolve_scales(conds, 1.0)
    cfg = BridgeConfig(per_year=True, segment_years=4.0)
    out = forecast(m, conds, xb, cond, scales, cfg, steps=3)
    one = BridgeConfig(per_year=True)
    # 9 years in three segments of 3, each from the last forecast, 3 years older each time
    x = xb[:1]
    for r in range(3):
        x = forecast(m, conds, x, encode(conds, [{**req, "age": 70 + 3 * r, "interval": 3.0}]), scales, one, steps=3)
    assert torch.allclose(out[0], x[0], atol=1e-5)
    # 2 years fit one segment: the same as without segments, whatever its batch neighbour needs
    ref = forecast(m, conds, xb[1:], encode(conds, [{**req, "interval": 2.0}]), scales, one, steps=3)
    assert torch.allclose(out[1], ref[0], atol=1e-5)
    assert not torch.allclose(out[0], forecast(m, conds, xb, cond, scales, one, steps=3)[0], atol=1e-3)


def test_counterfactual_round_trip_keeps_the_latent_when_nothing_changes():
    conds = toy_conditions()
    m = _model()
    x1 = torch.randn(2, 64, 4)
    cond = encode(conds, [REQ, REQ])
    scales = resolve_scales(conds, 1.0)
    same, x0 = counterfactual(m, conds, x1, cond, cond, scales, steps=20, method="heun")
    assert (same - x1).abs().max() < 1e-3
    changed = encode(conds, [apply_changes(conds, REQ, {"disease": "HC", "age": "+10"})] * 2)
    other, _ = counterfactual(m, conds, x1, cond, changed, scales, steps=20, method="heun")
    assert (other - x1).abs().max() > 1e-2


def test_apply_changes():
    conds = toy_conditions()
    out = apply_changes(conds, REQ, {"disease": "HC", "age": "+10", "sex": "null"})
    assert out == {"disease": "HC", "sex": None, "modality": "T2", "age": 82.0}
    assert apply_changes(conds, REQ, {"age": "40"})["age"] == 40.0
    with pytest.raises(ConditionError, match="vocabulary"):
        apply_changes(conds, REQ, {"disease": "XYZ"})
    with pytest.raises(ConditionError, match="relative"):
        apply_changes(conds, {"modality": "T1"}, {"age": "+10"})


def test_bridge_drift_target_is_the_interpolant_derivative():
    from g3n_dit.bridge import bridge_target, gamma_dot

    xb, xf, z = torch.randn(3, 64, 4), torch.randn(3, 64, 4), torch.randn(3, 64, 4)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    h = 1e-6
    fd = (bridge_point(xb.double(), xf.double(), t + h, z.double(), 0.4)
          - bridge_point(xb.double(), xf.double(), t - h, z.double(), 0.4)) / (2 * h)  # fmt: skip
    cfg = BridgeConfig(sigma=0.4, target="drift")
    assert torch.allclose(bridge_target(xb.double(), xf.double(), t, z.double(), cfg), fd, atol=1e-5)
    assert torch.allclose(bridge_target(xb, xf, t.float(), z, BridgeConfig(target="mean")), xf - xb)
    assert gamma_dot(torch.tensor(0.5), 0.4) == 0
