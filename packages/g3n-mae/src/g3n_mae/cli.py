"""``g3n-mae``: a thin command line over the Python API.

    g3n-mae train  --preset tiny --data VOLUMES_SET --run-dir runs/mae     # CPU or one GPU
    deepspeed --num_gpus 4 $(which g3n-mae) train --preset paper --data ... --run-dir ...
    g3n-mae train  --run-dir runs/mae --data VOLUMES_SET --resume
    g3n-mae train  --preset tiny --data VOLUMES_SET --run-dir runs/ft --init zoo/mae --steps 50   # warm start
    g3n-mae export runs/mae exports/mae-encoder --encoder-only
    g3n-mae encode runs/mae --volumes VOLUMES_SET --out TOKENS_SET --store both
    g3n-mae config --preset paper > mae.yaml        # edit, then: g3n-mae train --config mae.yaml ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml
from g3n_train.launcher import strip_launcher_args

from .config import PRESETS, ConfigError, MAEConfig, load_config, preset


def _config_from_args(args: argparse.Namespace) -> MAEConfig:
    saved = getattr(args, "run_dir", None) and Path(args.run_dir) / "config.json"
    if args.config:
        cfg = load_config(args.config)
    elif getattr(args, "resume", False) and saved and saved.is_file():
        cfg = load_config(saved)  # --resume continues the run's own config unless flags override it
    else:
        cfg = preset(args.preset)
    model, train = {}, {}
    for flag, key in (("mask_ratio", "mask_ratio"), ("norm_pix_loss", "norm_pix_loss")):
        if getattr(args, flag, None) is not None:
            model[key] = getattr(args, flag)
    for flag, key in (
        ("steps", "total_steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("warmup", "warmup_steps"),
        ("engine", "engine"), ("zero_stage", "zero_stage"), ("precision", "precision"), ("num_workers", "num_workers"),
        ("seed", "seed"), ("log_every", "log_every"), ("ckpt_every", "ckpt_every"), ("keep_last", "keep_last"),
        ("grad_clip", "grad_clip"), ("deterministic", "deterministic"), ("compile", "compile"),
        ("tensorboard", "tensorboard"),
    ):
        if getattr(args, flag, None) is not None:
            train[key] = getattr(args, flag)
    if train.get("total_steps") is not None and "warmup_steps" not in train:
        train["warmup_steps"] = min(cfg.train.warmup_steps, train["total_steps"])
    data = cfg.model_dump(mode="json")
    data["model"].update(model)
    data["train"].update(train)
    return MAEConfig.model_validate(data)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from .train import NonFiniteLossError, train

    cfg = _config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    manifests: list[str] = []
    if args.nproc > 1:  # local data-parallel processes (CPU/gloo or this node's GPUs), no launcher needed
        from .launch import SourceSpec, run_local

        if not (args.synthetic or args.data):
            print("g3n-mae train: give --data VOLUMES_SET (or --synthetic N for a demo)", file=sys.stderr)
            return 2
        spec = SourceSpec(shards=str(args.data) if args.data else None, synthetic=args.synthetic,
                          synthetic_seed=cfg.train.seed)
        run_local(args.nproc, cfg, spec, args.run_dir, resume=args.resume, threads=args.threads, init=args.init,
                  accept_checkpoint_config=args.accept_checkpoint_config)
        return 0
    if args.synthetic:
        from .data import InMemoryVolumes, brain_like_volumes

        source = InMemoryVolumes(brain_like_volumes(args.synthetic, cfg.model.img_size, seed=cfg.train.seed))
    elif args.data:
        import g3n_shards as gs

        source = gs.ShardSet.open(args.data, kind="volumes", stored_dtype=True)
        manifests.append(source.digest)
    else:
        print("g3n-mae train: give --data VOLUMES_SET (or --synthetic N for a demo)", file=sys.stderr)
        return 2
    try:
        res = train(cfg, source, args.run_dir, resume=args.resume, data_manifests=manifests, stop_at=args.stop_at,
                    init=args.init, accept_checkpoint_config=args.accept_checkpoint_config)
    except NonFiniteLossError as e:
        print(f"g3n-mae train: {e}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"steps": res.steps, "last_loss": res.losses[-1][1] if res.losses else None,
                          "checkpoint": str(res.last_checkpoint), "volumes_per_s": round(res.volumes_per_s, 3)}))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from .encode import encode_summary, encode_volume_set

    m = encode_volume_set(args.weights, args.volumes, args.out, store=args.store, batch_size=args.batch_size,
                          device=args.device, bf16=args.bf16, progress=not args.quiet, overwrite=args.overwrite)
    print(encode_summary(m))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_model

    path = export_model(args.src, args.out, encoder_only=args.encoder_only)
    print(path)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else preset(args.preset)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_untrained(args: argparse.Namespace) -> int:
    """Weights of a freshly initialised model: the random-initialisation baseline an encoder must beat."""
    import torch

    from .checkpoint import save_weights
    from .model import MAE3D

    cfg = load_config(args.config) if args.config else preset(args.preset)
    torch.manual_seed(args.seed)
    model = MAE3D(cfg.model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_weights(args.out, model.state_dict(), cfg.model, {"untrained": "true", "seed": str(args.seed)})
    print(json.dumps({"weights": str(args.out), "sha256": digest}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .model import count_parameters, param_count_formula

    model, cfg, digest = load_model(args.weights, encoder_only=True)
    print(json.dumps({"sha256": digest, "parameters": count_parameters(model), "formula": param_count_formula(cfg),
                      "token_grid": cfg.grid_size, "config": cfg.model_dump(mode="json")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="g3n-mae", description="BrainG3N 3D MAE: pretraining (DeepSpeed) and encoding.")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size preset (default: tiny)")
        sp.add_argument("--config", type=Path, help="YAML/JSON config (may name a preset and override fields)")

    t = sub.add_parser("train", help="pretrain the MAE (plain torch or DeepSpeed; CPU or GPUs)")
    add_config(t)
    t.add_argument("--data", type=str, help="a 'volumes' shard set: a folder or a WebDataset URL prefix")
    t.add_argument("--synthetic", type=int, default=0, metavar="N", help="train on N in-memory brain-like volumes (demo)")
    t.add_argument("--run-dir", type=Path, required=True, help="checkpoints, metrics.jsonl and TensorBoard logs go here")
    t.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    t.add_argument("--accept-checkpoint-config", action="store_true",
                   help="on --resume, keep the checkpoint's values where the given settings differ in fields a resume "
                        "cannot change (each is logged); without it such a difference is an error")
    t.add_argument("--init", type=Path, metavar="WEIGHTS",
                   help="warm start: full MAE weights (weights file, export dir, checkpoint dir or run dir) of the same "
                        "architecture; optimizer and step start fresh. A checkpoint found by --resume wins")
    t.add_argument("--nproc", type=int, default=1,
                   help="spawn N local data-parallel processes (for many GPUs/nodes use the deepspeed launcher)")
    t.add_argument("--engine", choices=["auto", "torch", "deepspeed"], help="default from config: auto = DeepSpeed if installed")
    t.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    t.add_argument("--steps", type=int, help="total optimizer steps")
    t.add_argument("--stop-at", type=int, help="stop (and checkpoint) at this step, e.g. at the end of a job slot")
    t.add_argument("--batch-size", type=int, help="volumes per process per step")
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int, help="warm-up steps")
    t.add_argument("--grad-clip", type=float)
    t.add_argument("--mask-ratio", type=float)
    t.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--num-workers", type=int, help="data loader worker processes per rank")
    t.add_argument("--seed", type=int)
    t.add_argument("--log-every", type=int)
    t.add_argument("--ckpt-every", type=int)
    t.add_argument("--keep-last", type=int)
    t.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (torch engine)")
    t.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None, help="TensorBoard logs in run-dir/tb")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("encode", help="unmasked encoder over a volumes set -> tokens set")
    e.add_argument("weights", type=Path, help="weights file, export dir, checkpoint dir or run dir")
    e.add_argument("--volumes", type=str, required=True, help="input 'volumes' shard set: a folder or a WebDataset URL prefix")
    e.add_argument("--out", type=Path, required=True, help="output 'tokens' shard set")
    e.add_argument("--store", choices=["tokens", "mean", "both"], default="both", help="token grid, mean, or both")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", help="cuda | cpu (default: cuda when available)")
    e.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    e.add_argument("--overwrite", action="store_true", help="redo a complete output set")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_encode)

    x = sub.add_parser("export", help="plain safetensors + MODEL_CARD.md from a run or checkpoint")
    x.add_argument("src", type=Path, help="run dir (latest checkpoint) or a checkpoint step dir")
    x.add_argument("out", type=Path, help="output directory")
    x.add_argument("--encoder-only", action="store_true", help="drop the decoder")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("config", help="print a preset or config file as YAML")
    add_config(c)
    c.set_defaults(func=cmd_config)

    u = sub.add_parser("untrained", help="weights of a model at random initialisation (a baseline for the probes)")
    add_config(u)
    u.add_argument("out", type=Path, help="output .safetensors file")
    u.add_argument("--seed", type=int, default=0, help="seed of the initialisation")
    u.set_defaults(func=cmd_untrained)

    i = sub.add_parser("info", help="describe a weights file")
    i.add_argument("weights", type=Path)
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError  # here: importing torch is too slow for --help

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"g3n-mae {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
