"""Benchmark: the MAE-CNN decoder on CPU, its activation layout and its upsampling.

`CnnDecoder3D.forward` turns its input channels-last on CPU (``cpu_channels_last``; oneDNN's 3D
convolutions run faster on that layout), and each `Upsample3D` runs its nearest x2 + 3x3x3 conv as
one transposed conv with a folded kernel (``folded``). This times the same weights three ways:
channels-first and unfolded (the original), channels-last and unfolded, channels-last and folded
(the default), as seconds per volume for a decode (inference) and for a training step (forward +
backward), with each variant's largest difference from the original's output. Random weights, the
``tiny`` preset's decoder (80x96x80 output) unless ``--preset`` says otherwise. Prints one JSON
document. Measure it as on an AVX2-only CPU with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2``.

    uv run python tools/bench/decoder_layout.py [--preset tiny] [--batch-size 2] [--reps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from g3n_mae.config import preset as mae_preset
from g3n_pipeline.zoo_pack import machine_description
from g3n_tokenizer.config import preset
from g3n_tokenizer.decoder import CnnDecoder3D, Upsample3D


def seconds(fn, reps: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["test", "tiny"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset(a.preset).mae_cnn
    dec = CnnDecoder3D(cfg.c, cfg.decoder)
    m = mae_preset(a.preset).model  # the token grid the decoder upsamples: the encoder's
    grid = tuple(s // p for s, p in zip(m.img_size, m.patch_size))
    z = torch.randn(a.batch_size, cfg.c, *grid)
    b = a.batch_size
    report: dict = {"preset": a.preset, "batch_size": b, "torch_threads": torch.get_num_threads(),
                    "cpu": machine_description(), "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", "none")}

    #: name -> (channels_last, folded)
    variants = {"channels_first": (False, False), "channels_last": (True, False),
                "channels_last_folded": (True, True)}

    def variant(name: str) -> CnnDecoder3D:
        dec.cpu_channels_last, Upsample3D.folded = variants[name]
        return dec

    def step(name: str) -> None:
        dec.zero_grad(set_to_none=True)
        variant(name)(z).square().mean().backward()

    with torch.inference_mode():
        dec.eval()
        reference = variant("channels_first")(z)
        report["max_abs_difference"] = {name: float((variant(name)(z) - reference).abs().max()) for name in variants}
        report["decode_s_per_volume"] = {name: seconds(lambda: variant(name)(z), a.reps) / b for name in variants}
    dec.train()
    report["train_step_s_per_volume"] = {name: seconds(lambda: step(name), a.reps) / b for name in variants}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
