"""Benchmark: g3n-tokenizer sizes and throughput (MAE-CNN and the AutoencoderKL baseline).

For one preset (``test`` 32^3, ``tiny`` 80x96x80, ``paper`` 160x192x160; the MAE encoder is the
g3n-mae preset of the same name, randomly initialised) it reports:
- parameters: frozen encoder, projection + CNN decoder (paper target ~43.7 M), AutoencoderKL;
- values per volume of each latent (paper: 38,400 for c = 32; 614,400 for AutoencoderKL);
- encode / decode / train-step throughput in volumes per second (and peak GPU memory on CUDA),
  after warm-up, at ``--precision`` (``auto``: bf16 autocast on CUDA, fp32 on CPU; ``bf16`` on a CPU
  without bf16 hardware shows what emulated bf16 costs);
- a short fit on brain-like phantoms (g3n-mae's ``brain_like_volumes``): reconstruction MSE in
  z-scored space before and after ``--fit-steps`` steps.
Prints one JSON document.

    uv run python tools/bench/tokenizer.py [--preset tiny] [--device cpu|cuda] [--batch-size 2] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from g3n_mae.config import preset as mae_preset  # noqa: E402
from g3n_mae.data import brain_like_volumes  # noqa: E402
from g3n_mae.model import MAE3D  # noqa: E402
from g3n_tokenizer.autoencoderkl import AutoencoderKLTokenizer  # noqa: E402
from g3n_tokenizer.config import preset  # noqa: E402
from g3n_tokenizer.decoder import count_parameters  # noqa: E402
from g3n_tokenizer.interface import values_per_volume, zscore_brain  # noqa: E402
from g3n_tokenizer.mae_cnn import MaeCnnTokenizer  # noqa: E402
from g3n_tokenizer.train import build_engine, train_step  # noqa: E402
from g3n_train import Dist  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device, reps: int) -> float:
    fn()  # warm-up
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / reps


def bench_tokenizer(tok, x: torch.Tensor, cfg, reps: int, fit_steps: int, dev: torch.device, precision: str) -> dict:
    b = x.shape[0]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    z = tok.encode(x)
    enc = timed(lambda: tok.encode(x), dev, reps)
    dec = timed(lambda: tok.decode(z), dev, reps)
    engine = build_engine(tok.train_module, cfg.train.model_copy(update={"engine": "torch", "precision": precision}),
                          Dist(device=dev))
    tok.bf16 = engine.bf16
    step = timed(lambda: train_step(engine, tok, x), dev, reps)
    out = {"latent_shape": list(tok.latent_shape), "values_per_volume": values_per_volume(tok),
           "encode_vol_per_s": b / enc, "decode_vol_per_s": b / dec, "train_step_vol_per_s": b / step,
           "bf16": engine.bf16}
    if dev.type == "cuda":
        out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if fit_steps:
        before = float(torch.mean((tok.decode(tok.encode(x)) - x) ** 2))
        for _ in range(fit_steps):
            train_step(engine, tok, x)
        after = float(torch.mean((tok.decode(tok.encode(x)) - x) ** 2))
        out.update(fit_steps=fit_steps + reps + 1, mse_before=before, mse_after=after)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["test", "tiny", "paper"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--c", type=lambda s: None if s == "none" else int(s), default=32)
    ap.add_argument("--skip-autoencoderkl", action="store_true")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "bf16-native"],
                    help="of the train step (encode and decode run as the trained tokenizer would)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    cfg = preset(a.preset, mae_cnn={"c": a.c})
    mcfg = mae_preset(a.preset).model
    report: dict = {"preset": a.preset, "device": str(dev), "precision": a.precision, "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "volume": list(mcfg.img_size), "patch": list(mcfg.patch_size), "batch_size": a.batch_size}
    with torch.device("meta"):
        paper = MaeCnnTokenizer(MAE3D(mae_preset("paper").model), preset("paper").mae_cnn)
        paper_ae = AutoencoderKLTokenizer(preset("paper").autoencoderkl)
    report["paper_params"] = {"encoder_frozen": sum(v.numel() for v in paper.encoder.encoder_state().values()),
                              "projection_plus_decoder": count_parameters(paper.head),
                              "autoencoderkl": count_parameters(paper_ae.ae),
                              "latent_values": {"mae_c32": values_per_volume(paper), "autoencoderkl": values_per_volume(paper_ae)}}
    vols = brain_like_volumes(a.batch_size, tuple(mcfg.img_size), seed=0)
    x = torch.from_numpy(np.stack([zscore_brain(v)[0] for v in vols.values()]))[:, None].to(dev)
    tok = MaeCnnTokenizer(MAE3D(mcfg), cfg.mae_cnn).to(dev)
    report["mae_cnn"] = {"c": a.c, "trainable_params": count_parameters(tok.head),
                         **bench_tokenizer(tok, x, cfg, a.reps, a.fit_steps, dev, a.precision)}
    if not a.skip_autoencoderkl:
        acfg = cfg.autoencoderkl.model_copy(update={"img_size": tuple(mcfg.img_size)})
        ae = AutoencoderKLTokenizer(type(acfg).model_validate(acfg.model_dump())).to(dev)
        report["autoencoderkl"] = {"trainable_params": count_parameters(ae.ae),
                                   **bench_tokenizer(ae, x, cfg, a.reps, a.fit_steps, dev, a.precision)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
