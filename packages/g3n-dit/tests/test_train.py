"""Training: exact resume, normalisation stats, toy direction test, pairs, rejects."""

from __future__ import annotations

import json

import pytest
import torch

from g3n_dit.checkpoint import list_checkpoints, load_checkpoint
from g3n_dit.conditions import encode
from g3n_dit.config import preset_run_config
from g3n_dit.data import ELEMENT_STD_FLOOR, in_memory, normalisation_stats
from g3n_dit.flow import initial_noise, resolve_scales, sample
from g3n_dit.train import TrainingError, load_model, next_batch, train

from dit_testutil import GRID, _flat, tiny_cfg, toy_set


def test_exact_resume_on_cpu(tmp_path):
    data = toy_set(20)
    a = train(tiny_cfg(), data, tmp_path / "a", progress=False)
    b1 = train(tiny_cfg(), data, tmp_path / "b", progress=False, stop_after=3)
    assert b1.step == 3
    ck = load_checkpoint(tmp_path / "b")
    assert ck.state["cursor"] == {"epoch": 1, "pos": 4}  # 3 x 8 = 24 of 20 items: 1 epoch + 4
    b2 = train(tiny_cfg(), data, tmp_path / "b", progress=False)
    assert b2.step == 6
    assert a.losses[3:] == b2.losses  # identical losses after resume
    ca, cb = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert torch.equal(_flat(ca.model), _flat(cb.model))
    assert torch.equal(_flat(ca.ema), _flat(cb.ema))
    assert ca.train.keys() == cb.train.keys() and any(k.startswith("exp_avg/") for k in ca.train)
    assert all(torch.equal(ca.train[k], cb.train[k]) for k in ca.train)
    assert torch.equal(ca.norm_mean, cb.norm_mean)
    # the schedule moved on: the loss history is not a copy of the first half
    assert a.losses[:3] == b1.losses


def test_optimizer_state_resumes_with_the_resuming_optimizers_own_kernel():
    """A checkpoint written by the fused AdamW restores into an unfused one (a machine without
    the kernel) with every moment and the step, and the unfused one keeps computing unfused."""
    from g3n_train.engine import load_optimizer_state_by_name, optimizer_state_by_name

    w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    fused = torch.optim.AdamW([w], lr=0.1, fused=True)
    w.grad = torch.ones_like(w)
    fused.step()
    tensors = optimizer_state_by_name(torch.nn.ParameterDict({"w": w}), fused)
    assert set(tensors) == {"exp_avg/w", "exp_avg_sq/w", "step/w"}
    v = torch.nn.Parameter(w.detach().clone())
    plain = torch.optim.AdamW([v], lr=0.5, foreach=False)
    load_optimizer_state_by_name(torch.nn.ParameterDict({"w": v}), plain, tensors)
    assert not plain.param_groups[0]["fused"] and plain.param_groups[0]["foreach"] is False
    st = plain.state[v]
    assert torch.equal(st["exp_avg"], fused.state[w]["exp_avg"]) and float(st["step"]) == 1.0
    assert st["step"].device.type == "cpu"


def test_checkpoint_contents_and_keep_last(tmp_path):
    data = toy_set(16)
    train(tiny_cfg(max_steps=4, ckpt_every=1, keep_last=2), data, tmp_path, progress=False)
    cks = list_checkpoints(tmp_path)
    assert [p.name for p in cks] == ["step-00000003", "step-00000004"]
    ck = load_checkpoint(tmp_path)
    # normalisation statistics of the training set are stored with the weights
    assert torch.allclose(ck.norm_mean, data.latents.reshape(-1, 4).mean(0), atol=1e-5)
    assert torch.allclose(ck.norm_std, data.latents.reshape(-1, 4).std(0, unbiased=False), atol=1e-5)
    st = ck.state
    assert {c["spec"]["name"] for c in st["conditions"]} == {"disease", "sex", "modality", "site", "age", "idh1"}
    vocab = {c["spec"]["name"]: c["vocab"] for c in st["conditions"]}
    assert vocab["disease"] == ["AD", "HC"] and vocab["site"] == ["site0", "site1", "site2"]
    assert vocab["idh1"] == []  # never recorded: only its null embedding exists
    assert not list(tmp_path.joinpath("checkpoints").glob(".tmp-*"))
    from g3n_shards.writer import current_umask  # files get the umask's mode, not safetensors' 0600

    assert {f.name: f.stat().st_mode & 0o777 for f in cks[-1].iterdir()} == {f.name: 0o666 & ~current_umask()
                                                                               for f in cks[-1].iterdir()}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4
    # a corrupted weights file is refused
    f = cks[-1] / "ema.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="SHA-256"):
        load_checkpoint(tmp_path)


def test_element_statistics_are_per_token_and_channel_with_a_floor():
    data = toy_set(16)
    x = data.latents.clone()
    x[:, 5, 2] = 7.0  # an element that never varies (an empty background)
    mean, std = normalisation_stats(x, "element")
    assert mean.shape == std.shape == (64, 4)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(std[0], x[:, 0].std(0, unbiased=False))
    # the constant element gets 1 % of its channel's spread, not 0: a new latent that differs there
    # by a little stays a little after standardisation
    assert std[5, 2] == pytest.approx(ELEMENT_STD_FLOOR * float(x[..., 2].reshape(-1).std(unbiased=False)), rel=1e-5)
    cm, cs = normalisation_stats(x, "channel")
    assert cm.shape == cs.shape == (4,)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalisation_stats(x, "token")


def test_cursor_covers_every_item_once_per_epoch():
    seen, cur = [], {"epoch": 0, "pos": 0}
    for _ in range(5):
        idx, cur = next_batch(10, 4, cur, seed=1)
        seen += idx.tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_resume_refuses_another_dataset(tmp_path):
    data = toy_set(16)
    data.digest = "sha256:aaa"
    train(tiny_cfg(max_steps=2), data, tmp_path, progress=False)
    data.digest = "sha256:bbb"
    with pytest.raises(TrainingError, match="aaa"):
        train(tiny_cfg(max_steps=4), data, tmp_path, progress=False)


@pytest.mark.parametrize("normalise,times", [("channel", "uniform"), ("element", "uniform"), ("channel", "logit_normal")])
def test_condition_moves_samples_in_the_requested_direction(tmp_path, normalise, times):
    torch.manual_seed(0)
    data = toy_set(64, shift=2.0)
    cfg = tiny_cfg(max_steps=150, batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.9, normalise=normalise,
                   time_sampling=times)
    train(cfg, data, tmp_path, progress=False)
    model, conds, (mean, std), _ = load_model(tmp_path, "ema", "cpu")
    assert mean.shape == std.shape == ((4,) if normalise == "channel" else (64, 4))
    scales = resolve_scales(conds, 1.5)
    n = 16
    out = {}
    for sex in ("F", "M"):
        cond = encode(conds, [{"sex": sex, "modality": "T1"}] * n)
        x = sample(model, conds, cond, initial_noise(range(n), (64, 4)), scales, steps=10)
        out[sex] = (x * std + mean)[..., 0].mean().item()
    # the data differ by +2 in channel 0; samples must follow the request
    print("direction", out)
    assert out["M"] - out["F"] > 1.0, out

    # counterfactual F -> M on real F latents: channel 0 goes up, the rest of the subject stays
    from g3n_dit.counterfactual import counterfactual

    fem = [i for i, m in enumerate(data.metas) if m["sex"] == "F"][:8]
    x1 = (data.latents[fem] - mean) / std
    reqs = [{"sex": "F", "modality": "T1", "age": data.metas[i]["age"]} for i in fem]
    new = [dict(r, sex="M") for r in reqs]
    cf, _ = counterfactual(model, conds, x1, encode(conds, reqs), encode(conds, new), resolve_scales(conds, 1.0), steps=10)
    cf = cf * std + mean
    src = data.latents[fem]
    assert (cf[..., 0] - src[..., 0]).mean() > 1.0
    # identity: each counterfactual is closer (channels 1-3) to its own source than to other subjects
    d = torch.cdist(cf[..., 1:].reshape(len(fem), -1), src[..., 1:].reshape(len(fem), -1))
    assert torch.equal(d.argmin(1), torch.arange(len(fem)))


def test_bf16_autocast_step_and_launcher_args(tmp_path, monkeypatch):
    data = toy_set(8)
    r = train(tiny_cfg(max_steps=1, precision="bf16"), data, tmp_path, progress=False)
    assert r.step == 1 and all(map(lambda v: v == v, r.losses))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["precision"] == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    train(tiny_cfg(max_steps=1, precision="auto"), data, tmp_path / "auto", progress=False)
    assert json.loads((tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()[-1])["precision"] == "fp32"
    from g3n_dit.cli import strip_launcher_args

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "train", "--out", "x"]) == ["train", "--out", "x"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"


@pytest.mark.parametrize("per_year", [False, True])
def test_bridge_learns_the_interval(tmp_path, per_year):
    """Follow-up = baseline + 0.5 * interval in channel 0: forecasts must grow with the interval."""
    g = torch.Generator().manual_seed(1)
    lat, metas = [], []
    for s in range(16):
        base = torch.randn(64, 4, generator=g) * 0.5
        for v, age in enumerate((60.0, 61.0 + s % 3, 63.0 + s % 4)):
            x = base.clone()
            x[:, 0] += 0.5 * (age - 60.0)
            lat.append(x + 0.05 * torch.randn(64, 4, generator=g))
            metas.append(dict(subject=f"s{s:02d}", session=f"v{v}", modality="T1", age=age, sex="F", diagnosis="HC"))
    data = in_memory(torch.stack(lat), metas, grid=GRID)
    t = dict(batch_size=16, max_steps=120, warmup_steps=10, lr=2e-3, ema_decay=0.9, log_every=50, ckpt_every=1000, seed=0)
    cfg = preset_run_config("tiny", "longitudinal", {"train": t, "bridge": {"sigma": 0.3, "per_year": per_year}})
    train(cfg, data, tmp_path, progress=False)
    from g3n_dit.bridge import forecast

    model, conds, (mean, std), ck = load_model(tmp_path, "ema", "cpu")
    base_idx = [i for i, m in enumerate(metas) if m["session"] == "v0"][:8]
    xb = (data.latents[base_idx] - mean) / std
    scales = resolve_scales(conds, 1.0)
    ch0 = {}
    for dt in (1.0, 4.0):
        cond = encode(conds, [{"diagnosis": "HC", "sex": "F", "age": 60.0, "interval": dt}] * len(base_idx))
        x = forecast(model, conds, xb, cond, scales, ck.run_config.bridge, steps=20) * std + mean
        ch0[dt] = (x - data.latents[base_idx])[..., 0].mean().item()
    print("bridge", ch0)
    assert ch0[4.0] - ch0[1.0] > 0.5, ch0  # the data say +1.5


def test_reverse_pairs_run_each_pair_backwards_with_the_end_sessions_conditions():
    from g3n_dit.config import BridgeConfig
    from g3n_dit.data import build_pairs

    metas = [dict(subject="s1", session=f"v{v}", modality="T1", age=age, sex="F", diagnosis="MCI", cdr=cdr)
             for v, (age, cdr) in enumerate(((70.0, 0.5), (72.5, 1.0)))]
    data = in_memory(torch.zeros(2, 64, 4), metas, grid=GRID)
    (fwd,) = build_pairs(data, BridgeConfig())
    fwd2, back = build_pairs(data, BridgeConfig(reverse_pairs=True))
    assert (fwd.base, fwd.follow, fwd.record["interval"]) == (fwd2.base, fwd2.follow, 2.5)
    assert (back.base, back.follow) == (1, 0)
    assert back.record["interval"] == -2.5 and back.record["baseline_age"] == 72.5 and back.record["cdr"] == 1.0
