"""Benchmark: the stage commands' glibc malloc settings (``g3n_pipeline.runner.MALLOC_ENV``).

Runs the same workload in two fresh interpreters, one with glibc's default malloc and one with
the runner's settings, and prints each child's wall time, user and system CPU seconds, minor page
faults and peak RSS, from the kernel's own accounting (``os.wait4``). The workload is what
dominates the demo's later stages: the ``tiny`` MAE-CNN decoder (random weights) decoding
volumes one at a time to float32 arrays, then a few training steps. Prints one JSON document.
Measure it also as on an AVX2-only CPU (``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2``).

    uv run python tools/bench/malloc_env.py [--volumes 12] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOAD = """
import sys, numpy as np, torch
from g3n_mae.config import preset as mae_preset
from g3n_tokenizer.config import preset
from g3n_tokenizer.decoder import CnnDecoder3D
torch.manual_seed(0)
cfg = preset("tiny").mae_cnn
dec = CnnDecoder3D(cfg.c, cfg.decoder)
m = mae_preset("tiny").model
grid = tuple(s // p for s, p in zip(m.img_size, m.patch_size))
volumes, steps = int(sys.argv[1]), int(sys.argv[2])
with torch.inference_mode():
    for _ in range(volumes):
        out = dec(torch.randn(1, cfg.c, *grid)).float().numpy().astype(np.float32)
for _ in range(steps):
    dec.zero_grad(set_to_none=True)
    dec(torch.randn(2, cfg.c, *grid)).square().mean().backward()
"""


def child(env: dict[str, str], volumes: int, steps: int) -> dict[str, float]:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, str(volumes), str(steps)], env=env)
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"the workload failed with exit status {proc.returncode}")
    return {"wall_s": round(time.perf_counter() - t, 2), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "minor_faults": ru.ru_minflt, "max_rss_mb": round(ru.ru_maxrss / 1024)}


def main() -> None:
    from g3n_pipeline.runner import MALLOC_ENV
    from g3n_pipeline.zoo_pack import machine_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=12, help="volumes to decode, one at a time")
    ap.add_argument("--steps", type=int, default=4, help="decoder training steps (batch 2) after the decodes")
    ap.add_argument("--reps", type=int, default=2, help="runs of each setting, alternated")
    a = ap.parse_args()
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    tuned = {**plain, **MALLOC_ENV}
    runs: dict[str, list[dict[str, float]]] = {"glibc default": [], "runner's MALLOC_ENV": []}
    for _ in range(a.reps):
        runs["glibc default"].append(child(plain, a.volumes, a.steps))
        runs["runner's MALLOC_ENV"].append(child(tuned, a.volumes, a.steps))
    print(json.dumps({"cpu": machine_description(), "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", "none"),
                      "volumes": a.volumes, "steps": a.steps, "malloc_env": MALLOC_ENV, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
