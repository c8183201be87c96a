"""``g3n-tokenizer``: train, encode, decode, sweep, list. A thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under a launcher such as ``deepspeed``), else CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(dev)
        return dev
    return torch.device(name)


def _c_value(text: str) -> int | None:
    if text.lower() in ("none", "no", "0"):
        return None
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"c must be a positive integer or 'none', got {text!r}")
    return v


def _train_overrides(a: argparse.Namespace) -> dict[str, Any]:
    train = {k: v for k, v in {"max_epochs": a.epochs, "patience": a.patience, "batch_size": a.batch_size, "lr": a.lr,
                               "engine": a.engine, "seed": a.seed, "steps_per_epoch": a.steps_per_epoch,
                               "precision": a.precision, "freeze": getattr(a, "freeze", None),
                               "flip_axes": getattr(a, "flip_axes", None)}.items()
             if v is not None}
    return {"train": train} if train else {}


def _config(a: argparse.Namespace):
    from .config import load_config, preset

    over = _train_overrides(a)
    if hasattr(a, "c"):
        over["mae_cnn"] = {"c": a.c}
    if getattr(a, "loss", None):
        over.setdefault("mae_cnn", {})["loss"] = a.loss
        over["autoencoderkl"] = {"loss": a.loss}
    if a.config:
        cfg = load_config(a.config)
        from .config import TokenizerConfig, _merge

        return TokenizerConfig.model_validate(_merge(cfg.model_dump(), over))
    return preset(a.preset, **over)


def cmd_train(a: argparse.Namespace) -> int:
    import g3n_shards as gs

    from .base import volume_geometry_from
    from .build import new_tokenizer
    from .train import train_tokenizer

    cfg = _config(a)
    ss = gs.ShardSet.open(a.volumes, kind="volumes")
    if a.tokenizer == "mae-cnn" and not a.mae_checkpoint:
        print("error: --mae-checkpoint is required for the mae-cnn tokenizer", file=sys.stderr)
        return 2
    tok, loss = new_tokenizer(a.tokenizer, cfg, volume_geometry_from(ss.manifest.geometry), a.mae_checkpoint,
                              ss.manifest.geometry.shape, _device(a.device))
    res = train_tokenizer(tok, ss, cfg.train, a.out, loss_kind=loss, resume=a.resume, progress=not a.quiet, init=a.init,
                          accept_checkpoint_config=a.accept_checkpoint_config)
    print(json.dumps({"checkpoint": str(res.checkpoint), "sha256": res.digest, "best_val": res.best_val,
                      "best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "stopped_early": res.stopped_early}, indent=1))
    return 0


def _load(a: argparse.Namespace):
    from .checkpoint import read_header
    from .registry import load_tokenizer

    name = a.tokenizer or read_header(a.checkpoint)["tokenizer"]
    return load_tokenizer(name, checkpoint=a.checkpoint, map_location=_device(a.device))


def cmd_encode(a: argparse.Namespace) -> int:
    from .shardio import encode_set

    tok = _load(a)
    m = encode_set(tok, a.volumes, a.out, batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.quiet)
    print(json.dumps({"out": a.out, "samples": m.num_samples, "digest": m.digest, "tokenizer": m.tokenizer.name,
                      "latent_shape": list(tok.latent_shape)}, indent=1))
    return 0


def cmd_decode(a: argparse.Namespace) -> int:
    import g3n_shards as gs

    from .shardio import decode_set

    affine = None
    if a.affine_from:
        affine = gs.ShardSet.open(a.affine_from).manifest.geometry.affine
        if affine is None:
            print(f"error: {a.affine_from}: its manifest records no affine", file=sys.stderr)
            return 2
    tok = _load(a) if a.checkpoint and a.tokenizer else None
    summary = decode_set(a.latents, a.out, fmt=a.format, tokenizer=tok, checkpoint=a.checkpoint, batch_size=a.batch_size,
                         affine=affine, keys=a.keys, overwrite=a.overwrite, progress=not a.quiet,
                         map_location=_device(a.device), intensity=a.intensity, mask=a.mask)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from .sweep import SweepConfig, run_sweep

    over = _train_overrides(a)
    cfg = SweepConfig(preset=a.preset, c_values=a.c_values, autoencoderkl=not a.no_autoencoderkl,
                      test_fraction=a.test_fraction, seed=a.seed or 0, probe_tasks=a.probe_tasks,
                      probe_protocol=a.probe_protocol, batch_size=a.batch_size or 2, overrides=over)
    rows = run_sweep(a.volumes, a.mae_checkpoint, a.out, cfg, device=_device(a.device), progress=not a.quiet)
    print((Path(a.out) / "table5.md").read_text())
    return 0 if rows else 1


def cmd_list(a: argparse.Namespace) -> int:
    from .registry import GROUP, available

    for name, ep in sorted(available().items()):
        print(f"{name}\t{ep.value}")
    if not available():
        print(f"(no tokenizers registered in {GROUP})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="g3n-tokenizer", description="BrainG3N tokenizers: train, encode volumes to latents, "
                                "decode latents to volumes/NIfTI, bottleneck sweep.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")

    def training(s: argparse.ArgumentParser) -> None:
        s.add_argument("--preset", default="paper", choices=["paper", "tiny", "test"])
        s.add_argument("--epochs", type=int, help="max epochs (paper: 80)")
        s.add_argument("--patience", type=int, help="early-stopping patience in epochs (paper: 40)")
        s.add_argument("--batch-size", type=int)
        s.add_argument("--lr", type=float)
        s.add_argument("--engine", choices=["torch", "deepspeed"])
        s.add_argument("--seed", type=int)
        s.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch")
        s.add_argument("--precision", choices=["auto", "fp32", "bf16", "bf16-native"],
                       help="bf16 autocast or fp32 (auto: bf16 on CUDA; bf16-native: also on CPUs with AMX or "
                            "AVX512-BF16, where it pays; elsewhere on CPU bf16 is emulated and tens of times slower)")

    t = sub.add_parser("train", help="train a tokenizer on a volumes set (early stopping on a validation split)")
    t.add_argument("--volumes", required=True, help="volumes shard set")
    t.add_argument("--out", required=True, help="run folder; the tokenizer is <out>/tokenizer.safetensors")
    t.add_argument("--tokenizer", default="mae-cnn", choices=["mae-cnn", "autoencoderkl"])
    t.add_argument("--mae-checkpoint", help="g3n-mae weights/export/checkpoint (mae-cnn)")
    t.add_argument("--config", help="YAML config (preset: name + overrides)")
    t.add_argument("--c", type=_c_value, default=argparse.SUPPRESS, help="projected channels per token, or 'none' (default 32)")
    t.add_argument("--loss", choices=["mse", "l1"])
    t.add_argument("--resume", action="store_true", help="continue from <out>/last.safetensors")
    t.add_argument("--accept-checkpoint-config", action="store_true",
                   help="on --resume, keep the run's own values where the given training settings differ in fields a "
                        "resume cannot change (each is logged); without it such a difference is an error")
    t.add_argument("--init", metavar="TOKENIZER.safetensors",
                   help="warm start: the trainable part (mae-cnn: projection + decoder; autoencoderkl: all) from a "
                        "checkpoint of the same tokenizer and config; optimizer fresh. --resume with state present wins")
    t.add_argument("--freeze", nargs="+", metavar="PART",
                   help="keep these parts of the trainable module as they are (mae-cnn 'proj': the decoder alone "
                        "learns and every latent stays what it was)")
    t.add_argument("--flip-axes", nargs="+", type=int, choices=[0, 1, 2], metavar="AXIS",
                   help="mirror each training volume along these axes with probability 1/2 (0: left-right in atlas space)")
    training(t)
    common(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("encode", help="volumes set -> latents set (the manifest names the tokenizer)")
    e.add_argument("--volumes", required=True)
    e.add_argument("--checkpoint", required=True, help="tokenizer checkpoint (.safetensors)")
    e.add_argument("--tokenizer", help="registry name (default: read from the checkpoint)")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--overwrite", action="store_true")
    common(e)
    e.set_defaults(fn=cmd_encode)

    d = sub.add_parser("decode", help="latents set -> volumes set or NIfTI files (atlas affine)")
    d.add_argument("--latents", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--format", choices=["volumes", "nifti"], default="volumes")
    d.add_argument("--checkpoint", help="tokenizer checkpoint (default: the path recorded in the latents manifest; "
                   "its SHA-256 must match the recorded digest)")
    d.add_argument("--tokenizer", help="registry name (default: the one the latents manifest records)")
    d.add_argument("--affine-from", help="a shard set whose manifest affine to use for NIfTI output")
    d.add_argument("--intensity", choices=["zscored", "original"], default="zscored",
                   help="zscored (what the tokenizer reconstructs) or original (needs --mask; see decode_set)")
    d.add_argument("--mask", help="brain mask NIfTI of the volume shape (> 0 = brain), for --intensity original")
    d.add_argument("--keys", nargs="+", default=None,
                   help="decode only these samples (decoding is the costly part); a key not in the set is an error")
    d.add_argument("--batch-size", type=int, default=2)
    d.add_argument("--overwrite", action="store_true")
    common(d)
    d.set_defaults(fn=cmd_decode)

    s = sub.add_parser("sweep", help="bottleneck sweep (Table 5): MAE-CNN at several c + AutoencoderKL")
    s.add_argument("--volumes", required=True)
    s.add_argument("--mae-checkpoint", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--c-values", type=_c_value, nargs="+", default=[32, 128, 512, None], help="e.g. 32 128 512 none")
    s.add_argument("--no-autoencoderkl", action="store_true")
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--probe-tasks", nargs="+", default=["idh1", "tumour_grade"])
    s.add_argument("--probe-protocol", default="paper", choices=["paper", "tiny"])
    training(s)
    common(s)
    s.set_defaults(fn=cmd_sweep)

    ls = sub.add_parser("list", help="registered tokenizers (entry-point group g3n.tokenizers)")
    ls.set_defaults(fn=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    from g3n_train.launcher import strip_launcher_args

    args = build_parser().parse_args(strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    import g3n_shards as gs
    from g3n_mae.checkpoint import CheckpointError as MaeCheckpointError

    from .errors import TokenizerError

    try:
        return int(args.fn(args))
    except (TokenizerError, gs.ShardError, MaeCheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
