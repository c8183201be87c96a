"""``g3n-eval``: reconstruction, controllability, fidelity, memorisation, forecasts, report.

Each subcommand is a thin layer over a ``run_*`` function and writes one metrics JSON file
(with ``protocol_version``, ``settings`` and the inputs' manifest digests) plus its PNGs into
``--out``; ``g3n-eval report`` gathers them into one HTML page.
Exit codes: 0 ok, 1 memorisation found with ``--gate`` (or an internal error, with its traceback),
2 bad input: one line on stderr naming the input and the reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _tok_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tokenizer (reached through the g3n.tokenizers registry)")
    g.add_argument("--tokenizer", default=None, help="registry name; default: the one a latents manifest names")
    g.add_argument("--tokenizer-checkpoint", default=None, help="checkpoint file (default: the path the manifest records)")


def _enc_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--encoder", required=required, default=None,
                   help="g3n-mae weights (.safetensors, export or checkpoint dir) used to (re-)encode volumes")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (metrics JSON, PNGs, rejects.jsonl)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="g3n-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("recon", help="MSE / PSNR / 3D SSIM of a tokenizer on a volumes set",
                       description="Reconstruction metrics, whole volume and brain mask, per volume and summarised.")
    p.add_argument("--volumes", required=True, help="volumes shard set (real)")
    p.add_argument("--recon", default=None, help="a volumes set of reconstructions (paired by key) instead of a tokenizer")
    _tok_args(p)
    p.add_argument("--limit", type=int, default=None, help="first N volumes (key order)")
    p.add_argument("--data-range", type=float, default=None, help="fixed PSNR/SSIM data range (default: per volume)")
    p.add_argument("--save-recon", action="store_true", help="also write the reconstructions as OUT/recon-volumes")
    _common(p)

    p = sub.add_parser("controllability", help="probe agreement on generated samples (Table 2a) and the age sweep")
    p.add_argument("--real", required=True, help="real features: tokens set / feature table (or volumes set with --encoder)")
    p.add_argument("--generated", required=True,
                   help="generated samples: latents set (decoded and re-encoded) or tokens set / feature table")
    p.add_argument("--task", action="append", default=None,
                   help="FIELD:CLASS1,CLASS2[,...] (repeatable); default: the paper's Table 2a rows")
    p.add_argument("--sweep", action="append", default=None, help="continuous condition to sweep (default: age)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--folds", type=int, default=5, help="CV folds for the 'real' column")
    p.add_argument("--permutations", type=int, default=99, metavar="N",
                   help="re-run the 'real' column's cross-validation on N shuffled labellings (default 99; 0: off): "
                        "a row whose probe does not beat them (p > 0.05) cannot judge generated samples")
    p.add_argument("--permutation-max-subjects", type=int, default=500, metavar="M",
                   help="rows whose probe is fitted on more than M subjects skip the test (default 500; their null "
                        "is narrow and the AUC <= 0.55 rule decides); 0: no limit")
    p.add_argument("--match-real", nargs="*", default=["modality"], metavar="FIELD",
                   help="fit each probe on the real samples whose FIELDs equal what every generated sample of its "
                        "row asked for (default: modality; give no FIELD to fit on every real sample)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--recon", default=None, metavar="SET",
                   help="the tokenizer's reconstructions of the real volumes (volumes set, keys as the real ones; "
                        "e.g. g3n-tokenizer decode of their latents): each probe, as cross-validated on real data, "
                        "also scores the reconstructions of the volumes it held out, to tell whether it can still "
                        "see its task on decoded volumes (volume space only)")
    p.add_argument("--space", choices=["volume", "latent"], default="volume",
                   help="volume (default, the paper's protocol): decode generated latents and re-encode them; "
                        "latent: probe real and generated latents sets of one tokenizer directly (token mean)")
    _tok_args(p)
    _enc_args(p)
    _common(p)

    p = sub.add_parser("anatomy", help="known anatomical effects of requests, measured on generated volumes (no probe)",
                       description="Measure the signatures of an anatomy spec (regions npz + YAML: region means, "
                       "contrasts, left-right asymmetries) on real volumes, to check each effect in real data, and on "
                       "generated volumes sampled with --paired, to see whether each request moved its signature the "
                       "expected way (sign test over noise groups). g3n-data synth-anatomy writes the spec of the "
                       "synthetic cohort.")
    p.add_argument("--spec", required=True, help="anatomy spec (YAML/JSON) with its regions npz beside it")
    p.add_argument("--real", required=True, help="real volumes shard set (on the spec's grid)")
    p.add_argument("--generated", required=True, help="generated volumes shard set (decoded samples)")
    p.add_argument("--recon", default=None, help="the tokenizer's reconstructions of real volumes (g3n-tokenizer decode "
                   "of their latents): how much of each effect the decoder can draw at all")
    p.add_argument("--limit", type=int, default=None, help="first N volumes of each set (key order)")
    _common(p)

    p = sub.add_parser("fidelity", help="FID on central slices and encoder-space Frechet distance")
    p.add_argument("--real", required=True, help="volumes set (or latents set to decode)")
    p.add_argument("--generated", default=None, help="generated latents set (decoded) or volumes set")
    p.add_argument("--recon", default=None, help="reconstructions of --real: a volumes set (e.g. from recon --save-recon), or 'auto' to run "
                        "--real through the generated latents' tokenizer here")
    p.add_argument("--inception-weights", default=None, help="Inception-V3 weights .safetensors (nothing downloads)")
    p.add_argument("--inception-variant", choices=["fid", "torchvision"], default="fid")
    p.add_argument("--skip-fid", action="store_true", help="only the encoder Frechet distance")
    p.add_argument("--image-size", type=int, default=299)
    p.add_argument("--slice-offsets", default="0", help="comma-separated plane offsets from the centre, e.g. -8,0,8")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--arm-field", default=None,
                   help="also per generation arm: group by this metadata field (e.g. diagnosis) and average over arms")
    p.add_argument("--limit", type=int, default=None)
    _tok_args(p)
    _enc_args(p)
    _common(p)

    p = sub.add_parser("memorisation", help="nearest-neighbour memorisation audit; --gate exits 1 when found")
    p.add_argument("--synthetic", required=True, help="synthetic latents (latents set or .npy)")
    p.add_argument("--train", required=True, help="training latents")
    p.add_argument("--heldout", required=True, help="held-out real latents (never trained on)")
    p.add_argument("--percentile", type=float, default=1.0)
    p.add_argument("--max-fraction-below", type=float, default=0.05)
    p.add_argument("--min-ratio", type=float, default=0.9)
    p.add_argument("--gate", action="store_true", help="exit 1 when memorisation is found (to block sharing)")
    _common(p)

    p = sub.add_parser("forecast", help="brain-age recovery and difference maps of longitudinal forecasts")
    p.add_argument("--forecasts", required=True, help="forecast latents set (from g3n-dit forecast)")
    p.add_argument("--baselines", required=True, help="the latents (or volumes) set the forecasts started from")
    p.add_argument("--age-probe", default=None, help="a g3n-probe brain-age probe folder")
    p.add_argument("--real", default=None, help="real features with ages to fit the age probe (if no --age-probe)")
    p.add_argument("--anatomy", default=None, help="an anatomy spec (g3n-data synth-anatomy) whose age effects are "
                   "also measured on the decoded forecasts: ageing checked with no probe")
    p.add_argument("--limit", type=int, default=None)
    _tok_args(p)
    _enc_args(p, required=True)
    _common(p)

    p = sub.add_parser("tokenizers", help="tokenizers side by side (Table 5 in kind): values per volume, held-out "
                       "MSE / PSNR / SSIM, probe AUCs on their latents")
    p.add_argument("--arm", nargs=3, action="append", required=True, metavar=("LABEL", "NAME", "CHECKPOINT"),
                   help="a tokenizer: its label in the table, registry name (mae-cnn, autoencoderkl) and checkpoint; repeat")
    p.add_argument("--volumes", required=True, help="volumes set whose latents are probed (subject-grouped CV)")
    p.add_argument("--heldout", required=True, help="held-out volumes set the reconstructions are scored on")
    p.add_argument("--tasks", default="idh1,tumour_grade", help="probe tasks (comma-separated; default: Table 5's)")
    p.add_argument("--slice", default="all", help="probe slice (default all)")
    p.add_argument("--limit", type=int, default=None, help="first N held-out volumes (key order)")
    _common(p)

    p = sub.add_parser("raw-features", help="raw voxels (z-scored, block means) as a g3n-probe feature table: the "
                       "encoder's baseline (probe it with `g3n-probe run TABLE --pca K`)")
    p.add_argument("--volumes", required=True, help="volumes set (the table is written to --out)")
    p.add_argument("--factor", type=int, default=4, help="block size of the means (default 4: 80x96x80 -> 9,600 values)")
    _common(p)

    p = sub.add_parser("report", help="one self-contained HTML page (index.html + PNGs) from metrics folders")
    p.add_argument("runs", nargs="+", help="folders (or JSON files) written by the other subcommands")
    p.add_argument("--probe-run", action="append", default=[], help="a g3n-probe run folder (results.csv) for the probe table")
    p.add_argument("--volumes", action="append", default=[], metavar="LABEL=SET",
                   help="extra montage: volumes or latents set (repeatable), e.g. real=data/volumes")
    p.add_argument("--title", default="BrainG3N evaluation report")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="show every path on the page relative to DIR (paths outside it as given). Default: the "
                        "nearest folder above --out holding a .stages folder or a demo-config.json (a g3n-pipeline "
                        "run), else the parent of --out's parent (the RUN of RUN/eval/report)")
    _tok_args(p)
    _common(p)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch  # only here: the measurements that need no model (anatomy, report, ...) start without it

        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    try:
        return _dispatch(args, progress)
    except input_errors() as e:
        print(f"g3n-eval {args.cmd}: error: {e}", file=sys.stderr)
        return 2


def input_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the *user's input* cannot be used (exit 2, one line, no traceback).

    Each is raised only where an input (a set, a file, an option) is at fault and names it:
    g3n-eval's own :class:`~g3n_eval.data.InputError` and the input errors of the packages it
    reads through (shard sets, metadata, feature tables, probe files, tokenizer checkpoints and
    latents). Anything else, ``ValueError`` and ``KeyError`` included, is a bug and keeps its traceback.
    """
    import g3n_shards as gs
    from g3n_probe import FeatureSourceError, ProbeFileError
    from g3n_tokenizer.errors import TokenizerError

    from .data import InputError
    from .frechet import FrechetError
    from .inception import WeightsError
    from .records import MetricsFileError

    return (InputError, WeightsError, FrechetError, MetricsFileError, gs.ShardError, gs.MetadataError,
            FeatureSourceError, ProbeFileError, TokenizerError)


def _pct(v: float | None) -> str:
    """A fraction as a percentage; NaN (written as null) as n/a."""
    return "n/a" if v is None or v != v else f"{100 * v:.0f} %"


def _keeps_detail(recon: dict) -> str:
    """' (95 % interval a to b; per volume x, r y)' for an anatomy row's reconstruction figures."""
    lo, hi = recon.get("keeps_interval") or (None, None)
    r = recon.get("r")
    return (f" (95 % interval {_pct(lo)} to {_pct(hi)}; per volume the reconstructions keep {_pct(recon.get('slope'))}"
            f" of the signature, r {'n/a' if r is None or r != r else f'{r:.2f}'})")


def _tokenizers(args: argparse.Namespace):
    from .sources import TokenizerCache

    return TokenizerCache(args.tokenizer_checkpoint, args.tokenizer, args.device)


def _encoder(args: argparse.Namespace):
    if not getattr(args, "encoder", None):
        return None
    from .models import MAEFeatures

    return MAEFeatures(args.encoder, args.device)


def _dispatch(args: argparse.Namespace, progress: bool) -> int:
    import json

    from .data import InputError

    if args.cmd == "recon":
        from .models import TokenizerHandle
        from .recon import run_recon

        tok = None
        if args.recon is None:
            if not args.tokenizer or not args.tokenizer_checkpoint:
                raise InputError("give --recon SET, or --tokenizer NAME and --tokenizer-checkpoint FILE")
            tok = TokenizerHandle(args.tokenizer, args.tokenizer_checkpoint, args.device)
        doc = run_recon(args.volumes, args.out, tok, args.recon, args.limit, args.data_range, args.save_recon, progress=progress)
        print(json.dumps({k: v["mean"] for k, v in doc["results"]["summary"].items()}, indent=1))
        return 0
    if args.cmd == "controllability":
        from .controllability import PAPER_TASKS, run_controllability

        sweeps = [] if args.no_sweep else (args.sweep or ["age"])
        doc = run_controllability(args.real, args.generated, args.out, args.task or PAPER_TASKS, sweeps,
                                  None if args.space == "latent" else _encoder(args), _tokenizers(args), None,
                                  args.folds, args.limit, progress, space=args.space, match=args.match_real,
                                  permutations=args.permutations,
                                  permutation_max_subjects=args.permutation_max_subjects or None, recon=args.recon)
        for name, row in doc["results"]["tasks"].items():
            print(f"{name}: cond agreement {row['cond']['agreement']}, AUC {row['cond']['auc']}")
        for name, why in doc["results"]["skipped"].items():
            print(f"{name}: skipped ({why})")
        return 0
    if args.cmd == "anatomy":
        from .anatomy import run_anatomy

        doc = run_anatomy(args.spec, args.real, args.generated, args.out, args.limit, progress, args.recon)
        def num(v: float | None) -> str:  # NaN is written as null
            return "n/a" if v is None else f"{v:+.3f}"

        for name, row in doc["results"]["effects"].items():
            pair = row["paired"]
            print(f"{name} ({row['signature']}, expect {row['expect']}): real {num(row['real']['difference'])} "
                  f"({'confirms' if row['real_confirms'] else 'does not confirm'}); generated pairs moved "
                  f"{pair['n_moved']}/{pair['n_groups']}, mean change {num(pair['mean_change'])}"
                  + (f"; reconstructions {num(row['recon']['difference'])}, keep {_pct(row['recon_keeps'])} of the real effect on the same volumes"
                     f"{_keeps_detail(row['recon'])}" if "recon" in row else ""))
        return 0
    if args.cmd == "fidelity":
        from .fidelity import run_fidelity

        offsets = tuple(int(s) for s in str(args.slice_offsets).split(",") if s.strip())
        doc = run_fidelity(args.real, args.out, args.generated, args.recon, _tokenizers(args), args.inception_weights,
                           args.inception_variant, args.skip_fid, _encoder(args), args.image_size, offsets, args.limit,
                           args.batch_size, args.device, progress, arm_field=args.arm_field)
        print(json.dumps({"fid": doc["results"]["fid"], "encoder_fd": doc["results"]["encoder_fd"]}, indent=1))
        return 0
    if args.cmd == "memorisation":
        from .memorisation import MemorisationConfig, run_memorisation

        cfg = MemorisationConfig(percentile=args.percentile, max_fraction_below=args.max_fraction_below,
                                 min_ratio=args.min_ratio)
        doc = run_memorisation(args.synthetic, args.train, args.heldout, args.out, cfg)
        r = doc["results"]
        print(f"ratio of means {r['ratio_of_means']:.3f}; {r['fraction_below']:.3f} below the threshold; "
              f"{r['n_copies']} copies -> {'MEMORISATION' if r['memorisation'] else 'no memorisation'}")
        for reason in r["reasons"]:
            print(f"  {reason}")
        return 1 if (args.gate and r["memorisation"]) else 0
    if args.cmd == "forecast":
        from .forecast import run_forecast

        if args.age_probe is None and args.real is None:
            raise InputError("give --age-probe PROBE_DIR or --real FEATURES to fit the brain-age probe")
        doc = run_forecast(args.forecasts, args.baselines, args.out, _encoder(args), _tokenizers(args), args.real,
                           args.age_probe, None, args.limit, progress=progress, anatomy=args.anatomy)
        a = doc["results"]["age"]
        print(f"{doc['results']['n_pairs']} forecasts: slope {a['slope']}, Pearson r {a['pearson_r']}")
        for name, r in (doc["results"].get("anatomy") or {}).items():
            pr = r.get("paired") or {}
            print(f"anatomy {name} ({r['signature']}): moved with the interval in {pr.get('n_moved')}/{pr.get('n_groups')} "
                  f"baselines (p {pr.get('p', float('nan')):.3g})")
        return 0
    if args.cmd == "tokenizers":
        from .models import TokenizerHandle
        from .tokenizers import run_tokenizers

        arms = [(label, TokenizerHandle(name, ckpt, args.device)) for label, name, ckpt in args.arm]
        doc = run_tokenizers(args.volumes, args.heldout, arms, args.out, [t for t in args.tasks.split(",") if t],
                             args.slice, limit=args.limit, progress=progress)
        for r in doc["results"]["rows"]:
            aucs = ", ".join(f"{t} AUC {'n/a' if a is None else format(a, '.3f')}" for t, a in r["auc"].items())
            print(f"{r['tokenizer']}: {r['values_per_volume']:,} values/volume, MSE {r['mse']:.4f}, PSNR {r['psnr']:.2f}, "
                  f"SSIM {r['ssim']:.3f}; {aucs}")
        return 0
    if args.cmd == "raw-features":
        from .baselines import raw_voxel_features

        print(raw_voxel_features(args.volumes, args.out, args.factor, progress=progress))
        return 0
    if args.cmd == "report":
        from .report import build_report

        path = build_report(args.runs, args.out, probe_runs=args.probe_run, volumes=args.volumes, title=args.title,
                            tokenizers=_tokenizers(args), root=args.root)
        print(path)
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    raise SystemExit(main())
