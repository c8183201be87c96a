"""Benchmark g3n-mae: training throughput, model FLOPs utilisation, peak memory, encode throughput.

    uv run python tools/bench/mae.py                      # CUDA -> paper preset (bf16), else tiny on CPU
    uv run python tools/bench/mae.py --preset paper --batch-sizes 4 8 16 32 --compile
    uv run python tools/bench/mae.py --preset tiny --device cpu --batch-sizes 1 2 --out bench.json

What is measured, per preset and batch size:
* train: volumes/s of full optimizer steps (forward, masked-patch loss, backward, clip, AdamW) through
  the same ``TorchEngine`` the trainer uses (bf16 autocast on CUDA), after warm-up steps;
* MFU: model FLOPs (``g3n_mae.flops.train_flops_per_volume``: matmuls of patch embedding, encoder
  on visible tokens, decoder on all tokens, head; x3 for forward+backward) x volumes/s / the card's
  dense bf16 peak (H100 SXM 989 TFLOP/s, override with --peak-tflops);
* peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak RSS
  (monotonic, so batch sizes run in increasing order);
* encode: volumes/s of the unmasked encoder (no grad), the ``g3n-mae encode`` inner loop.
The target for the paper preset on one H100 in bf16 is MFU >= 40 %.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from g3n_mae.config import preset
from g3n_mae.data import brain_like_volumes, zscore_brain_torch
from g3n_mae.masking import sample_noise
from g3n_mae.flops import encode_flops_per_volume, train_flops_per_volume
from g3n_mae.model import MAE3D
from g3n_mae.train import engine_spec, lr_at
from g3n_train import Dist, TorchEngine

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def make_batch(cfg, batch_size: int, device: torch.device):
    vols = brain_like_volumes(min(batch_size, 4), cfg.model.img_size, seed=0)
    arr = [torch.from_numpy(v).half() for v in vols.values()]  # as stored in shards
    x = torch.stack([arr[i % len(arr)] for i in range(batch_size)]).unsqueeze(1).to(device)
    noise = torch.stack([sample_noise(0, 0, f"k{i}", cfg.model.num_patches) for i in range(batch_size)]).to(device)
    return x, noise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg, batch_size: int, device: torch.device, warmup: int, steps: int, compile_: bool) -> dict:
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch_size, "compile": compile_})})
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = TorchEngine(MAE3D(cfg.model), engine_spec(cfg, "torch", device), Dist(device=device))
    x, noise = make_batch(cfg, batch_size, device)
    engine.module.train()

    def step(i: int) -> float:
        engine.set_lr(lr_at(i, cfg))
        with engine.autocast():
            loss, _, _ = engine.model(zscore_brain_torch(x), noise=noise)  # the loop z-scores on the device
        engine.backward(loss)
        engine.step()
        return loss

    for i in range(warmup):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    sync(device)
    dt = time.perf_counter() - t0
    vps = steps * batch_size / dt
    out = {"mode": "train", "batch_size": batch_size, "volumes_per_s": vps, "step_s": dt / steps,
           "tflops_per_s": train_flops_per_volume(cfg.model) * vps / 1e12, "peak_mem_gib": peak_memory_gib(device),
           "loss": float(loss.detach())}
    return out  # engine, x and noise (held by step's closure too) are freed with this frame


@torch.no_grad()
def bench_encode(cfg, batch_size: int, device: torch.device, warmup: int, steps: int, bf16: bool) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = MAE3D(cfg.model).to(device).eval()
    x, _ = make_batch(cfg, batch_size, device)
    for _ in range(warmup):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.encode(zscore_brain_torch(x))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            model.encode(zscore_brain_torch(x))
    sync(device)
    dt = time.perf_counter() - t0
    vps = steps * batch_size / dt
    out = {"mode": "encode", "batch_size": batch_size, "volumes_per_s": vps, "step_s": dt / steps,
           "tflops_per_s": encode_flops_per_volume(cfg.model) * vps / 1e12, "peak_mem_gib": peak_memory_gib(device)}
    del model, x
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="default: paper on CUDA, tiny on CPU")
    p.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: 4 8 16 32 on CUDA, 1 2 on CPU")
    p.add_argument("--encode-batch-size", type=int, help="default: the largest batch size")
    p.add_argument("--warmup", type=int, help="untimed steps (default 5 CUDA, 1 CPU)")
    p.add_argument("--steps", type=int, help="timed steps (default 20 CUDA, 3 CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: from the card's name)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line (tools/bench/run_all.py)")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.preset or ("paper" if cuda else "tiny")
    precision = "bf16" if cuda and not args.fp32 else "fp32"
    cfg = preset(name, train={"precision": precision, "engine": "torch", "tensorboard": False})
    sizes = sorted(args.batch_sizes or ([4, 8, 16, 32] if cuda else [1, 2]))
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    steps = args.steps if args.steps is not None else (20 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_tflops(device, args.peak_tflops)
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    m = cfg.model
    print(f"g3n-mae bench: preset={name} device={card} precision={precision} compile={args.compile} "
          f"volume={m.img_size} patch={m.patch_size} tokens={m.num_patches} visible={m.num_visible}")
    print(f"  model FLOPs per volume: train {train_flops_per_volume(m) / 1e9:.1f} GFLOP, "
          f"encode {encode_flops_per_volume(m) / 1e9:.1f} GFLOP; peak {peak or 'unknown'} TFLOP/s")
    results = []
    for bs in sizes:
        try:
            r = bench_train(cfg, bs, device, warmup, steps, args.compile)
        except torch.OutOfMemoryError:
            print(f"  train  batch {bs:3d}: out of memory")
            results.append({"mode": "train", "batch_size": bs, "oom": True})
            break
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
        results.append(r)
        mfu = f"  MFU {100 * r['mfu']:.1f} %" if r["mfu"] is not None else ""
        print(f"  train  batch {bs:3d}: {r['volumes_per_s']:8.2f} vol/s  {r['tflops_per_s']:8.3f} TFLOP/s{mfu}  "
              f"peak mem {r['peak_mem_gib']:.2f} GiB")
    ebs = args.encode_batch_size or sizes[-1]
    try:
        r = bench_encode(cfg, ebs, device, warmup, steps, precision == "bf16")
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
        results.append(r)
        print(f"  encode batch {ebs:3d}: {r['volumes_per_s']:8.2f} vol/s  {r['tflops_per_s']:8.3f} TFLOP/s  "
              f"peak mem {r['peak_mem_gib']:.2f} GiB")
    except torch.OutOfMemoryError:
        print(f"  encode batch {ebs:3d}: out of memory")
    if not cuda:
        print("  note: no CUDA device here; the paper-preset GPU figures (target MFU >= 40 % on one H100, bf16) "
              "are pending a run on a GPU machine.")
    report = {"preset": name, "device": card, "precision": precision, "compile": args.compile, "peak_tflops": peak,
              "torch": torch.__version__, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
