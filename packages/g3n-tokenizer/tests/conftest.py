"""Shared fixtures: a tiny g3n-mae checkpoint, a 32^3 volumes set, a briefly trained MAE-CNN tokenizer.

Everything is session-scoped and tiny (32^3 volumes, 8^3 patches = 64 tokens, encoder width 48)
so the whole suite stays within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import g3n_shards as gs
from g3n_shards.testing import make_meta

SHAPE = (32, 32, 32)
AFFINE = [[-2.0, 0.0, 0.0, 90.0], [0.0, -2.0, 0.0, 126.0], [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """One torch thread for this package's tests (deterministic numbers, polite on shared cores);
    session-scoped so that the session fixtures below train under it too; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("g3n_tokenizer")


@pytest.fixture(scope="session")
def mae_checkpoint(workdir) -> Path:
    """A (random-init, deterministic) g3n-mae test-preset model saved by g3n-mae's own writer."""
    from g3n_mae.checkpoint import save_weights
    from g3n_mae.config import preset
    from g3n_mae.model import MAE3D

    torch.manual_seed(0)
    cfg = preset("test").model
    path = workdir / "mae" / "model.safetensors"
    save_weights(path, MAE3D(cfg).state_dict(), cfg)
    return path


def write_cohort(out: Path, n: int = 12, seed: int = 0) -> gs.Manifest:
    """Brain-like volumes (g3n-mae's varied phantoms) with tumour labels for the probe columns."""
    from g3n_mae.data import brain_like_volumes

    vols = brain_like_volumes(n, SHAPE, seed=seed)
    with gs.ShardWriter(out, kind="volumes", producer=gs.Producer(package="g3n-tokenizer-tests"),
                        geometry=gs.Geometry(shape=SHAPE, spacing=(2.0, 2.0, 2.0), patch_size=(8, 8, 8), affine=AFFINE,
                                             space="SRI24"), max_shard_samples=4) as w:
        for i, (_, v) in enumerate(sorted(vols.items())):
            m = make_meta(i, idh1="mutant" if i % 2 else "wildtype", tumour_grade=[2, 3, 4][i % 3], diagnosis="GBM")
            w.write(gs.sample_key(m), m, {"volume": v * 8.0})
    assert w.manifest is not None
    return w.manifest


@pytest.fixture(scope="session")
def volumes_set(workdir) -> Path:
    out = workdir / "volumes"
    write_cohort(out)
    return out


@pytest.fixture(scope="session")
def trained(workdir, mae_checkpoint, volumes_set):
    """(train result, tokenizer before training's encoder state, first validation loss) of a short MAE-CNN run."""
    from g3n_tokenizer.config import preset
    from g3n_tokenizer.mae_cnn import MaeCnnTokenizer
    from g3n_tokenizer.train import train_tokenizer, validation_loss

    torch.manual_seed(0)
    cfg = preset("test")
    ss = gs.ShardSet.open(volumes_set)
    tok = MaeCnnTokenizer.from_mae(mae_checkpoint, cfg.mae_cnn)
    enc_before = {k: v.clone() for k, v in tok.encoder.encoder_state().items()}
    from g3n_tokenizer.data import split_subjects

    splits = split_subjects(ss.metadata(), {"val": cfg.train.val_fraction}, seed=0)
    untrained = validation_loss(tok, ss, splits["val"], 2, "mse")
    res = train_tokenizer(tok, ss, cfg.train, workdir / "run-mae", splits=splits, progress=False)
    return {"result": res, "encoder_before": enc_before, "untrained_val": untrained, "tokenizer": tok, "splits": splits}


@pytest.fixture(scope="session")
def latents_set(workdir, trained, volumes_set) -> Path:
    from g3n_tokenizer.registry import load_tokenizer
    from g3n_tokenizer.shardio import encode_set

    tok = load_tokenizer("mae-cnn", checkpoint=trained["result"].checkpoint)
    out = workdir / "latents"
    encode_set(tok, volumes_set, out, progress=False, max_shard_samples=5)
    return out


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def cohort_affine() -> np.ndarray:
    return np.asarray(AFFINE, dtype=np.float64)


@pytest.fixture(scope="session")
def cohort_writer():
    """The cohort writer, for tests that need a second set."""
    return write_cohort
