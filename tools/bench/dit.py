"""Benchmark g3n-dit: time to sample 64 latents, and training throughput.

With CUDA: the paper preset (12 blocks, hidden 1024, 16 heads, 1200 tokens x 32 channels) on the
GPU (the card is reported). Without: the tiny preset on the CPU (the GPU figure is then pending).
The network is randomly initialised (with its zero-initialised layers perturbed so every pass
does real work); timing does not depend on the weights.

    uv run python tools/bench/dit.py                 # auto: paper on CUDA, else tiny on CPU
    uv run python tools/bench/dit.py --preset paper --device cuda --precision bf16 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from g3n_dit.conditions import encode, resolve_conditions
from g3n_dit.config import DiTConfig, MODEL_PRESETS, TRAIN_PRESETS, default_generation_conditions
from g3n_dit.flow import autocast_for, flow_matching_loss, initial_noise, resolve_precision, resolve_scales, sample
from g3n_dit.model import DiT, count_parameters
from g3n_train import param_groups

VOCAB = {
    "disease": ["AD", "ADHD", "ASD", "GBM", "HC", "MCI", "PD", "SCZ"],
    "sex": ["F", "M"],
    "modality": ["FLAIR", "T1", "T1c", "T2"],
    "site": [f"site{i:02d}" for i in range(19)],
    "idh1": ["mutant", "wildtype"],
}
REQUEST = {"disease": "AD", "sex": "F", "modality": "T1", "site": "site03", "age": 72.0, "idh1": None}


def build(preset: str, device: torch.device):
    specs = default_generation_conditions()
    for s in specs:
        if s.kind == "categorical":
            s.vocab = VOCAB[s.name]
    conds = resolve_conditions(specs)
    torch.manual_seed(0)
    model = DiT(DiTConfig(**MODEL_PRESETS[preset]), conds)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(device), conds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_sampling(model, conds, device, n, steps, batch, precision, per_condition: bool) -> dict:
    scales = resolve_scales(conds, 1.5, {"disease": 2.0, "sex": 1.0, "age": 1.5} if per_condition else None)
    cfg = model.cfg
    # warm-up (kernels, autotuning) on one small batch
    sample(model, conds, encode(conds, [REQUEST] * min(batch, n)), initial_noise(range(min(batch, n)), (cfg.num_tokens, cfg.channels)),
           scales, steps=2, precision=precision)  # fmt: skip
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        b = min(batch, n - start)
        sample(model, conds, encode(conds, [REQUEST] * b), initial_noise(range(start, start + b), (cfg.num_tokens, cfg.channels)),
               scales, steps=steps, precision=precision)  # fmt: skip
    sync(device)
    dt = time.perf_counter() - t0
    distinct = len({scales[c.name] for c in conds if not c.spec.always_on and REQUEST.get(c.name) is not None})
    return {"n": n, "steps": steps, "batch": batch, "seconds": round(dt, 3), "per_sample_s": round(dt / n, 4),
            "network_passes_per_step": 1 + distinct, "guidance": scales}  # fmt: skip


def bench_training(model, conds, device, batch, steps, precision) -> dict:
    cfg = model.cfg
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    x1 = torch.randn(batch, cfg.num_tokens, cfg.channels, device=device)
    cond = {k: (v.to(device), p.to(device)) for k, (v, p) in encode(conds, [REQUEST] * batch).items()}
    gen = torch.Generator().manual_seed(0)
    model.train()

    def one() -> float:
        with autocast_for(device, precision):
            loss = flow_matching_loss(model, x1, cond, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(2):
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    dt = time.perf_counter() - t0
    model.eval()
    out = {"batch": batch, "steps": steps, "seconds": round(dt, 3), "samples_per_s": round(batch * steps / dt, 2)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(MODEL_PRESETS), default=None, help="default: paper on CUDA, tiny on CPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=None, help="sampling batch (default: all n on CUDA, 16 on CPU)")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto",
                    help="default auto: bf16 on CUDA and on CPUs with AMX, else fp32")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--train-batch", type=int, default=None, help="default: the preset's training batch")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default 1 on CPU: the tiny model gains nothing from more, and shared cores lose)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    preset = args.preset or ("paper" if device.type == "cuda" else "tiny")
    precision = resolve_precision(args.precision, device)
    batch = args.batch or (args.n if device.type == "cuda" else 16)
    model, conds = build(preset, device)
    res = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "precision": precision,
        "parameters": count_parameters(model),
        "torch": torch.__version__,
        "gpu_figure": "measured" if device.type == "cuda" else "pending (no GPU in this run)",
    }  # fmt: skip
    with torch.no_grad():
        res["sample_equal_scales"] = bench_sampling(model, conds, device, args.n, args.steps, batch, precision, False)
        res["sample_per_condition_scales"] = bench_sampling(model, conds, device, args.n, args.steps, batch, precision, True)
    tb = args.train_batch or TRAIN_PRESETS[preset]["batch_size"]
    res["train"] = bench_training(model, conds, device, tb, args.train_steps, precision)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
