"""``train --init`` / ``train-longitudinal --init``: warm start from another run's checkpoint."""

from __future__ import annotations

import pytest
import torch

import g3n_dit.train as T
from g3n_dit.checkpoint import CheckpointError, load_checkpoint
from g3n_dit.cli import main
from g3n_dit.config import preset_run_config
from g3n_dit.data import in_memory

from dit_testutil import GRID, tiny_cfg, toy_set


def _spy_start(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """The raw weights when the engine is built and the EMA weights before their first update (step 0)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    real_build = T.build_engine

    def spy_build(kind, model, spec, d):
        seen["raw"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_build(kind, model, spec, d)

    real_update = T.ema_update

    def spy_update(ema, model, decay):
        seen.setdefault("ema", {k: v.detach().clone() for k, v in ema.state_dict().items()})
        real_update(ema, model, decay)

    monkeypatch.setattr(T, "build_engine", spy_build)
    monkeypatch.setattr(T, "ema_update", spy_update)
    return seen


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_init_loads_raw_and_ema_keeps_statistics_and_resume_wins(tmp_path, monkeypatch, capsys):
    T.train(tiny_cfg(max_steps=3), toy_set(16), tmp_path / "zoo", progress=False)
    init = load_checkpoint(tmp_path / "zoo")
    assert not torch.equal(init.model["final.linear.weight"], init.ema["final.linear.weight"])
    new = toy_set(16, shift=2.5, seed=1)  # other latents: their own statistics would differ
    seen = _spy_start(monkeypatch)
    res = T.train(tiny_cfg(max_steps=1, seed=9), new, tmp_path / "run", progress=False, init=tmp_path / "zoo")
    assert res.step == 1
    assert _equal(seen["raw"], init.model) and _equal(seen["ema"], init.ema)
    ck = load_checkpoint(tmp_path / "run")
    assert torch.equal(ck.norm_mean, init.norm_mean) and torch.equal(ck.norm_std, init.norm_std)
    assert not torch.allclose(new.latents.reshape(-1, 4).mean(0), init.norm_mean)
    assert float(ck.train["step/x_embed.weight"]) == 1.0  # fresh AdamW: one update
    assert ck.state["init"]["path"] == str(init.path.resolve()) and ck.state["init"]["ema_sha256"] == init.digest("ema")
    assert "latent statistics" in capsys.readouterr().out

    seen.clear()
    T.train(tiny_cfg(seed=9), new, tmp_path / "run", max_steps=2, progress=False, init=init.path)  # resume: config from the run
    assert "not applied" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "run")
    assert ck.step == 2 and float(ck.train["step/x_embed.weight"]) == 2.0 and ck.state["init"]["step"] == 3
    assert not _equal(seen["raw"], init.model)  # the resumed run's own weights, not the init's


def _pairs_set():
    g = torch.Generator().manual_seed(2)
    lat, metas = [], []
    for s in range(4):
        for v, age in enumerate((60.0, 61.0, 62.5)):
            lat.append(torch.randn(64, 4, generator=g))
            metas.append(dict(subject=f"s{s}", session=f"v{v}", modality="T1", age=age, sex="F", diagnosis="HC"))
    return in_memory(torch.stack(lat), metas, grid=GRID)


def test_longitudinal_init_and_refusals(tmp_path, monkeypatch, capsys):
    t = dict(batch_size=4, max_steps=1, warmup_steps=0, log_every=1, ckpt_every=100, ema_decay=0.9)
    lcfg = preset_run_config("tiny", "longitudinal", {"train": t})
    pairs = _pairs_set()
    T.train(lcfg, pairs, tmp_path / "long", progress=False)
    seen = _spy_start(monkeypatch)
    T.train(lcfg, pairs, tmp_path / "long2", progress=False, init=tmp_path / "long" / "checkpoints" / "step-00000001")
    init = load_checkpoint(tmp_path / "long")
    assert _equal(seen["raw"], init.model) and _equal(seen["ema"], init.ema)

    T.train(tiny_cfg(max_steps=1), toy_set(16), tmp_path / "gen", progress=False)
    with pytest.raises(CheckpointError, match="is a generation checkpoint; this run trains longitudinal"):
        T.train(lcfg, pairs, tmp_path / "x1", progress=False, init=tmp_path / "gen")
    with pytest.raises(CheckpointError, match="is a longitudinal checkpoint; this run trains generation"):
        T.train(tiny_cfg(max_steps=1), toy_set(16), tmp_path / "x2", progress=False, init=tmp_path / "long")
    narrow = preset_run_config("tiny", overrides={"model": {"hidden": 32}, "train": tiny_cfg().train.model_dump()})
    with pytest.raises(CheckpointError, match=r"gen.*model\.hidden: 64 in the init, 32 in this run"):
        T.train(narrow, toy_set(16), tmp_path / "x3", progress=False, init=tmp_path / "gen")
    other_vocab = toy_set(16)
    other_vocab.metas[0]["diagnosis"] = "MCI"
    with pytest.raises(CheckpointError, match=r"conditions\.disease\.vocab: \['AD', 'HC'\] in the init, \['AD', 'HC', 'MCI'\]"):
        T.train(tiny_cfg(max_steps=1), other_vocab, tmp_path / "x4", progress=False, init=tmp_path / "gen")
    rate = preset_run_config("tiny", "longitudinal", {"train": t, "bridge": {"per_year": True}})
    with pytest.raises(CheckpointError, match=r"bridge\.per_year: False in the init, True in this run"):
        T.train(rate, pairs, tmp_path / "x5", progress=False, init=tmp_path / "long")
    assert not any((tmp_path / f"x{i}" / "checkpoints").exists() for i in range(1, 6))

    for cmd in ("train", "train-longitudinal"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--init CKPT" in capsys.readouterr().out


def _write_latents(path) -> None:
    """12 subjects x 2 sessions of random 64 x 4 latents (pairs for the bridge too)."""
    import g3n_shards as gs
    import numpy as np

    rng = np.random.default_rng(0)
    with gs.ShardWriter(path, kind="latents", producer=gs.Producer(package="g3n-dit-tests"),
                        geometry=gs.Geometry(shape=(32, 32, 32), patch_size=(8, 8, 8), channels=4),
                        tokenizer=gs.ModelRef(name="toy-tokenizer", checkpoint_digest="sha256:" + "0" * 64)) as w:
        for i in range(12):
            for s in range(2):
                meta = gs.SampleMeta(subject=f"sub-{i:02d}", session=f"ses-{s}", modality="T1", age=60.0 + i + 1.5 * s,
                                     sex="M" if i % 2 else "F", diagnosis=["HC", "AD"][i % 2])
                w.write(gs.sample_key(meta), meta, {"latent": rng.normal(size=(64, 4)).astype(np.float32)})


def test_cli_init(tmp_path, capsys):
    import yaml

    _write_latents(tmp_path / "lat")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"train": {"batch_size": 8, "max_steps": 2, "warmup_steps": 1}}))
    args = ["--latents", str(tmp_path / "lat"), "--config", str(tmp_path / "cfg.yaml"), "--quiet", "--device", "cpu"]
    assert main(["train", *args, "--out", str(tmp_path / "zoo")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "run"), "--init", str(tmp_path / "zoo"), "--max-steps", "1"]) == 0
    ck, init = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "zoo")
    assert ck.step == 1 and ck.state["init"]["model_sha256"] == init.digest("raw")
    assert torch.equal(ck.norm_mean, init.norm_mean)
    capsys.readouterr()
    assert main(["train-longitudinal", *args, "--out", str(tmp_path / "long"), "--init", str(tmp_path / "zoo")]) == 2
    assert "is a generation checkpoint; this run trains longitudinal" in capsys.readouterr().err


def test_init_from_a_shipped_fp16_step_folder(tmp_path, monkeypatch):
    """A model zoo ships a step folder with fp16 raw/EMA weights (statistics fp32), state.json with
    their digests and no training state: it warm-starts a run like a checkpoint does."""
    import json

    from g3n_shards import file_sha256
    from safetensors.torch import load_file, save_file

    T.train(tiny_cfg(max_steps=2), toy_set(16), tmp_path / "run0", progress=False)
    src = load_checkpoint(tmp_path / "run0").path
    zoo = tmp_path / "zoo" / "dit"
    zoo.mkdir(parents=True)
    state = json.loads((src / "state.json").read_text())
    for f in ("model.safetensors", "ema.safetensors"):
        t = load_file(str(src / f))
        save_file({k: v if k.startswith("norm.") else v.half() for k, v in t.items()}, str(zoo / f))
        state["files"][f] = file_sha256(zoo / f)
    state["files"].pop("train.safetensors")
    (zoo / "state.json").write_text(json.dumps(state))
    seen = _spy_start(monkeypatch)
    T.train(tiny_cfg(max_steps=1), toy_set(16), tmp_path / "run", progress=False, init=zoo)
    shipped = load_checkpoint(zoo, with_train_state=False)
    assert _equal(seen["raw"], {k: v.float() for k, v in shipped.model.items()})
    assert _equal(seen["ema"], {k: v.float() for k, v in shipped.ema.items()})
    assert all(v.dtype == torch.float32 for v in load_checkpoint(tmp_path / "run").model.values())
