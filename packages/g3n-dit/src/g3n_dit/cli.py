"""``g3n-dit``: a thin command line over the Python API.

    g3n-dit train --latents LAT --out RUN [--preset tiny|paper] [--config cfg.yaml]
    g3n-dit sample --checkpoint RUN --out SYN --n 64 --condition disease=AD --condition modality=T1 --condition age=70
    g3n-dit train-longitudinal --latents LAT --out RUN_L
    g3n-dit train --latents LAT2 --out RUN2 --init RUN --max-steps 200     # warm start from another run
    g3n-dit forecast --checkpoint RUN_L --latents BASELINES --out FC --intervals 1 2 5
    g3n-dit counterfactual --checkpoint RUN --latents REAL --out CF --set disease=AD --set age=+10
    g3n-dit info RUN
    deepspeed --num_gpus 4 $(which g3n-dit) train --engine deepspeed --zero-stage 1 --preset paper --latents LAT --out RUN
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import g3n_shards as gs
from g3n_train.launcher import strip_launcher_args  # noqa: F401 - re-exported (tests, tools)

from .checkpoint import CheckpointError, load_checkpoint
from .conditions import ConditionError
from .config import MODEL_PRESETS, SampleConfig, load_run_config


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    """['a=1', 'b=null'] -> {'a': '1', 'b': None}; values are converted by each condition."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConditionError(f"{what} {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = None if v.strip().lower() in ("null", "none") else v.strip()
    return out


def _scales(items: list[str] | None) -> dict[str, float]:
    out = {}
    for k, v in _pairs(items, "--guidance-for").items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ConditionError(f"--guidance-for {k}={v}: not a number") from None
    return out


def _train(args: argparse.Namespace, task: str) -> int:
    from .data import load_latents
    from .train import train

    cfg = load_run_config(args.config, args.preset, task)
    upd: dict[str, Any] = {}
    for name in ("engine", "zero_stage", "batch_size", "seed", "precision", "lr"):
        v = getattr(args, name)
        if v is not None:
            upd[name] = v
    if upd:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=upd)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_latents(args.latents, rejects=gs.RejectLog(out / gs.REJECTS_NAME), progress=not args.quiet)
    if data.grid is not None and tuple(data.grid) != tuple(cfg.model.grid):
        # the token grid and channels come from the data's manifest geometry, not from the preset
        cfg.model = cfg.model.model_copy(update={"grid": tuple(data.grid)})
    if data.latents.shape[-1] != cfg.model.channels:
        c = int(data.latents.shape[-1])
        # the bridge's baseline context has the latents' width too
        cfg.model = cfg.model.model_copy(update={"channels": c, "context_channels": c if cfg.model.context_channels else 0})
    cfg = type(cfg).model_validate(cfg.model_dump())
    res = train(cfg, data, out, resume=not args.no_resume, max_steps=args.max_steps, device=args.device, progress=not args.quiet,
                init=args.init, accept_checkpoint_config=args.accept_checkpoint_config)
    print(json.dumps({"run": str(res.run_dir), "step": res.step, "checkpoint": str(res.checkpoint),
                      "last_loss": res.losses[-1] if res.losses else None,
                      "samples_per_s": round(res.samples_per_s, 2)}))  # fmt: skip
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return _train(args, "generation")


def cmd_train_longitudinal(args: argparse.Namespace) -> int:
    return _train(args, "longitudinal")


def cmd_sample(args: argparse.Namespace) -> int:
    from .generate import GenerationRequest, sample_latents

    reqs = []
    if args.requests:
        for ln, line in enumerate(Path(args.requests).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                reqs.append(GenerationRequest(conditions=dict(d["conditions"]), n=int(d.get("n", 1))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConditionError(f"{args.requests}:{ln}: bad request line ({e}); expected {{\"conditions\": {{...}}, \"n\": 8}}") from None
    else:
        reqs.append(GenerationRequest(conditions=_pairs(args.condition, "--condition"), n=args.n))
    cfg = SampleConfig(
        steps=args.steps, method=args.sampler, guidance=args.guidance, guidance_per_condition=_scales(args.guidance_for),
        seed=args.seed, paired=args.paired, batch_size=args.batch_size, precision=args.precision, weights=args.weights,
    )  # fmt: skip
    m = sample_latents(args.checkpoint, reqs, args.out, cfg, device=args.device, progress=not args.quiet, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "samples": m.num_samples, "digest": m.digest}))
    return 0


def _ode_kwargs(args: argparse.Namespace) -> dict:
    """The integration and output options forecast and counterfactual share, from their flags."""
    return dict(keys=args.keys, steps=args.steps, method=args.sampler, guidance=args.guidance,
                guidance_per_condition=_scales(args.guidance_for), weights=args.weights, precision=args.precision,
                batch_size=args.batch_size, device=args.device, progress=not args.quiet, overwrite=args.overwrite)


def cmd_forecast(args: argparse.Namespace) -> int:
    from .generate import forecast_latents

    seg = "checkpoint" if args.segment_years is None else (None if args.segment_years <= 0 else args.segment_years)
    m = forecast_latents(args.checkpoint, args.latents, args.intervals, args.out, segment_years=seg,
                         overrides=_pairs(args.condition, "--condition"), **_ode_kwargs(args))
    print(json.dumps({"out": args.out, "samples": m.num_samples, "digest": m.digest}))
    return 0


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from .generate import counterfactual_latents

    m = counterfactual_latents(args.checkpoint, args.latents, _pairs(args.set, "--set"), args.out, **_ode_kwargs(args))
    print(json.dumps({"out": args.out, "samples": m.num_samples, "digest": m.digest}))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ck = load_checkpoint(args.checkpoint, with_train_state=False)
    rc = ck.run_config
    print(json.dumps({
        "path": str(ck.path), "step": ck.step, "task": rc.task, "model": rc.model.model_dump(mode="json"),
        "conditions": {c.name: list(c.vocab) if c.categorical else "continuous" for c in ck.conditions()},
        "drop_prob": {c.name: c.spec.drop_prob for c in ck.conditions()},
        "data": ck.state.get("data", {}).get("digest"), "ema_digest": ck.digest("ema"),
    }, indent=2))  # fmt: skip
    return 0


def _common_infer(p: argparse.ArgumentParser, steps: int, sampler: str, guidance: float) -> None:
    p.add_argument("--checkpoint", required=True, help="a run folder (latest checkpoint) or a step folder")
    p.add_argument("--out", required=True, help="output latents shard set (folder)")
    p.add_argument("--steps", type=int, default=steps, help=f"ODE steps (default {steps})")
    p.add_argument("--sampler", choices=["euler", "heun"], default=sampler, help=f"ODE method (default {sampler})")
    p.add_argument("--guidance", type=float, default=guidance, help=f"guidance scale w for every condition (default {guidance})")
    p.add_argument("--guidance-for", action="append", metavar="NAME=W", help="per-condition guidance scale (repeatable)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latents", required=True, help="training latents shard set (folder)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, rejects.jsonl)")
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="tiny",
                   help="model and training sizes: paper (docs/method.md), small (CPU demo), tiny (tests)")
    p.add_argument("--config", default=None, help="YAML overriding the preset (model, conditions, train, bridge)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--engine", choices=["torch", "deepspeed"], default=None)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=None,
                   help="DeepSpeed ZeRO stage (engine deepspeed): 1 shards the optimizer state, 2 also gradients")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default=None,
                   help="training precision (default: the preset's); auto = bf16 on CUDA and on CPUs with AMX")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run folder has checkpoints")
    p.add_argument("--accept-checkpoint-config", action="store_true",
                   help="when resuming, keep the checkpoint's values where the given settings differ in fields a resume "
                        "cannot change (each is logged); without it such a difference is an error")
    p.add_argument("--init", metavar="CKPT", default=None,
                   help="warm start from a checkpoint of the same kind (run folder: latest; or a step folder): raw and "
                        "EMA weights and its latent statistics; optimizer and step fresh. A checkpoint in --out resumes "
                        "instead")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="g3n-dit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train the conditional flow-matching DiT on a latents set")
    _common_train(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-longitudinal", help="train the baseline -> follow-up bridge on latent pairs")
    _common_train(p)
    p.set_defaults(func=cmd_train_longitudinal)

    p = sub.add_parser("sample", help="generate synthetic latents with per-condition guidance")
    _common_infer(p, 50, "euler", 1.5)
    p.add_argument("--n", type=int, default=64, help="samples for the --condition request (default 64)")
    p.add_argument("--condition", action="append", metavar="NAME=VALUE", help="e.g. disease=AD, age=70 (repeatable)")
    p.add_argument("--requests", help="JSONL of {\"conditions\": {...}, \"n\": N} (instead of --condition)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--paired", action="store_true",
                   help="sample j of every request uses seed + j: requests share their noise and differ only in "
                        "their conditions (paired controllability)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("forecast", help="forecast follow-up latents from baselines at given intervals")
    _common_infer(p, 100, "euler", 1.0)
    p.add_argument("--latents", required=True, help="baseline latents shard set")
    p.add_argument("--keys", nargs="+", default=None, help="only these baseline keys")
    p.add_argument("--intervals", nargs="+", type=float, default=[1.0, 2.0], help="years (default 1 2)")
    p.add_argument("--condition", action="append", metavar="NAME=VALUE", help="override a baseline condition")
    p.add_argument("--segment-years", type=float, default=None, metavar="Y",
                   help="forecast longer intervals as a chain of segments of at most Y years, each from the last "
                        "(default: the checkpoint's bridge.segment_years; 0: one jump)")
    p.set_defaults(func=cmd_forecast)

    p = sub.add_parser("counterfactual", help="invert real latents and regenerate them under changed conditions")
    _common_infer(p, 50, "heun", 1.0)
    p.add_argument("--latents", required=True, help="source latents shard set")
    p.add_argument("--keys", nargs="+", default=None, help="only these source keys")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", required=True,
                   help="a change: disease=AD, age=+10 (relative), age=70, idh1=null (repeatable)")  # fmt: skip
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args))
    except (ValueError, CheckpointError, gs.ShardError, OSError) as e:  # bad input: config, condition, data, file
        print(f"g3n-dit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TrainingError and friends
        print(f"g3n-dit: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
