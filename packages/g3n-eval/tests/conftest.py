"""Shared tiny fixtures: a 32^3 volumes set, a random-init g3n-mae test model, an untrained
MAE-CNN tokenizer (reached through the registry), real and synthetic latents sets.

Everything is session-scoped, made only through other packages' public APIs, and tiny so the
whole suite runs in well under three minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import g3n_shards as gs
from g3n_shards.testing import brain_like, make_meta
from g3n_eval.cli import main


SHAPE = (32, 32, 32)
N_REAL = 16


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("g3n_eval")


@pytest.fixture(scope="session")
def volumes_set(work) -> Path:
    """16 brain-like volumes; older subjects get a slightly darker, smaller 'brain' (a real age signal)."""
    rng = np.random.default_rng(0)
    out = work / "volumes"
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-eval-tests"),
                        geometry=gs.Geometry(shape=SHAPE, spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8)),
                        max_shard_samples=6, extra={"intensity": "scanner"}) as w:
        for i in range(N_REAL):
            m = make_meta(i, age=20.0 + 4 * i)
            v = brain_like(rng, SHAPE) * (1.0 - 0.01 * i)
            w.write(gs.sample_key(m), m, {"volume": v})
    return out


@pytest.fixture(scope="session")
def mae_weights(work) -> Path:
    from g3n_mae.checkpoint import save_weights
    from g3n_mae.config import preset
    from g3n_mae.model import MAE3D

    torch.manual_seed(0)
    cfg = preset("test").model
    path = work / "mae" / "model.safetensors"
    save_weights(path, MAE3D(cfg).state_dict(), cfg)
    return path


@pytest.fixture(scope="session")
def tokenizer_ckpt(work, mae_weights) -> Path:
    """An untrained MAE-CNN tokenizer (test preset) saved by g3n-tokenizer's own writer."""
    from g3n_tokenizer.config import preset
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer

    torch.manual_seed(0)
    tok = MaeCnnTokenizer.from_mae(mae_weights, preset("test").mae_cnn)
    path = work / "tok" / "tokenizer.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return path


def _latents(path: Path, tok, items, generator: bool = False) -> Path:
    ref = tok.model_ref()
    with gs.ShardWriter(path, kind="latents", producer=gs.Producer(package="g3n-eval-tests"), tokenizer=ref,
                        generator=gs.ModelRef(name="test-generator") if generator else None,
                        geometry=tok.geometry, max_shard_samples=8) as w:
        for key, meta, lat in items:
            w.write(key, meta, {"latent": np.asarray(lat, np.float32)})
    return path


@pytest.fixture(scope="session")
def latent_sets(work, volumes_set, tokenizer_ckpt) -> dict[str, Path]:
    """Real latents (train: first 10, held-out: last 6), synthetic samples with requests, and forecasts."""
    from g3n_tokenizer.registry import load_tokenizer

    tok = load_tokenizer("mae-cnn", checkpoint=tokenizer_ckpt)
    ss = gs.ShardSet.open(volumes_set)
    keys, metas, lats = [], [], []
    for s in ss:
        v = s.arrays["volume"]
        brain = v > 0
        z = np.zeros_like(v)
        z[brain] = (v[brain] - v[brain].mean()) / v[brain].std()
        lats.append(tok.encode(torch.from_numpy(z)[None, None])[0].numpy())
        keys.append(s.key)
        metas.append(s.meta)
    out = {
        "train": _latents(work / "lat-train", tok, list(zip(keys[:10], metas[:10], lats[:10]))),
        "heldout": _latents(work / "lat-heldout", tok, list(zip(keys[10:], metas[10:], lats[10:]))),
    }
    rng = np.random.default_rng(1)
    spread = float(np.std(lats))
    syn, fc = [], []
    for i in range(12):
        sex = ["F", "M", None][i % 3]
        age = [30.0, 50.0, 70.0][(i // 3) % 3] if i < 9 else None
        req = {"stage": "sample", "conditions": {"sex": sex, "age": age, "modality": "T1"}, "sampler": "euler",
               "steps": 50, "guidance": {"sex": 1.5, "age": 1.5}, "precision": "fp32", "seed": i}
        meta = gs.SampleMeta(subject=f"syn-{i}", cohort="synthetic", modality="T1", sex=sex, age=age, synthetic=True,
                             request=req)
        base = lats[i % N_REAL]
        syn.append((gs.sample_key(meta), meta, base + rng.normal(0, spread, base.shape)))
    out["synthetic"] = _latents(work / "lat-synthetic", tok, syn, generator=True)
    out["copies"] = _latents(work / "lat-copies", tok,
                             [(f"copy-{i}", gs.SampleMeta(subject=f"c{i}", modality="T1", synthetic=True), lats[i])
                              for i in range(6)], generator=True)
    for i in range(8):
        src = keys[10 + i % 6]
        dt = [1.0, 2.0, 4.0, 8.0][i % 4]
        req = {"stage": "forecast", "source": {"key": src, "set": "x"}, "interval": dt, "conditions": {},
               "sampler": "euler", "steps": 100, "precision": "fp32", "seed": None}
        meta = gs.SampleMeta(subject=f"fc-{i}", session=f"fc{i}", modality="T1", synthetic=True, request=req)
        base = lats[10 + i % 6]
        fc.append((gs.sample_key(meta), meta, base + 0.05 * dt * rng.normal(0, spread, base.shape)))
    out["forecasts"] = _latents(work / "lat-forecast", tok, fc, generator=True)
    return out


@pytest.fixture(scope="session")
def inception_weights(work) -> Path:
    """Random-init FID-variant Inception weights in a safetensors file (real ones are user-given)."""
    from g3n_eval.inception import InceptionV3Features
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = InceptionV3Features("fid", num_classes=1008)
    path = work / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def runs(work, volumes_set, latent_sets, tokenizer_ckpt, mae_weights, inception_weights):
    """Run every measurement once; the report test reuses the outputs."""
    out = work / "runs"
    codes = {}
    codes["recon"] = main(["recon", "--volumes", str(volumes_set), "--tokenizer", "mae-cnn", "--tokenizer-checkpoint",
                           str(tokenizer_ckpt), "--limit", "6", "--save-recon", "--out", str(out / "recon"), "--no-progress"])
    codes["fidelity"] = main(["fidelity", "--real", str(volumes_set), "--generated", str(latent_sets["synthetic"]),
                              "--recon", str(out / "recon" / "recon-volumes"), "--tokenizer-checkpoint", str(tokenizer_ckpt),
                              "--inception-weights", str(inception_weights), "--image-size", "75", "--limit", "6",
                              "--encoder", str(mae_weights), "--out", str(out / "fidelity"), "--no-progress"])
    codes["controllability"] = main(["controllability", "--real", str(volumes_set), "--generated", str(latent_sets["synthetic"]),
                                     "--task", "sex:F,M", "--task", "diagnosis:HC,PD", "--sweep", "age", "--folds", "3",
                                     "--encoder", str(mae_weights), "--tokenizer-checkpoint", str(tokenizer_ckpt),
                                     "--out", str(out / "controllability"), "--no-progress"])
    codes["memorisation"] = main(["memorisation", "--synthetic", str(latent_sets["synthetic"]), "--train",
                                  str(latent_sets["train"]), "--heldout", str(latent_sets["heldout"]), "--gate",
                                  "--out", str(out / "memorisation"), "--no-progress"])
    codes["forecast"] = main(["forecast", "--forecasts", str(latent_sets["forecasts"]), "--baselines",
                              str(latent_sets["heldout"]), "--real", str(volumes_set), "--encoder", str(mae_weights),
                              "--tokenizer-checkpoint", str(tokenizer_ckpt), "--out", str(out / "forecast"), "--no-progress"])
    return out, codes
