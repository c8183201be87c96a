"""How much of each anatomy effect does a tokenizer's reconstruction keep, on enough volumes to say?

The demo measures ``recon_keeps`` on its held-out split: 13-19 first visits per group, too few for
the small effects (HC -> MCI ventricles, HC -> PD putamen), whose real group difference there is
inside its own noise. This renders a fresh synthetic cohort (another seed than the demo's, so no
subject of the demo's train split), T1 first visits only, of the two cohorts that carry those
effects (ADNI-like: HC, MCI, AD; PPMI-like: HC, PD), reconstructs every volume with the tokenizer
(``g3n-tokenizer encode`` then ``decode``) and runs ``g3n-eval anatomy --recon`` on it. Prints, per
effect, the groups' sizes, the real difference and its Cohen's d, the share the reconstructions keep with its
bootstrap interval, and the per-volume slope and r.

    uv run python tools/recon_effects.py --tokenizer "$(uv run g3n-zoo path mae-cnn)" --work runs/recon-effects

About 600 subjects: 1-2 minutes to render, 3-6 to reconstruct on 2 cores. Each step's output is
kept in ``--work`` and reused when present (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

#: the synthetic cohort's own ADNI- and PPMI-like cohorts (their diagnoses, ages, sexes, sites),
#: each scanned once, in T1 only
COHORTS = {"SYN-ADNI": 0.6, "SYN-PPMI": 0.4}


def cohorts() -> list[dict]:
    from g3n_data.synth.config import SynthConfig

    defaults = {c.name: c for c in SynthConfig().cohorts}
    once = {"longitudinal": 0.0, "extra_modalities": {}}
    return [defaults[name].model_copy(update={"weight": w, **once}).model_dump(mode="json") for name, w in COHORTS.items()]


def _run(argv: list[str], done: Path) -> None:
    if done.exists():
        print(f"kept: {done}")
        return
    print("$ " + " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", *argv], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a mae-cnn tokenizer checkpoint (tokenizer.safetensors)")
    p.add_argument("--work", type=Path, required=True, help="folder for the cohort, latents, reconstructions, results")
    p.add_argument("--subjects", type=int, default=600)
    p.add_argument("--seed", type=int, default=7, help="the cohort's seed (the demo's is 2025)")
    a = p.parse_args(argv)
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    cfg = w / "synth.yaml"
    cfg.write_text(yaml.safe_dump({"cohorts": cohorts()}))
    _run(["g3n_data.cli", "synth", "--out", str(w / "volumes"), "--subjects", str(a.subjects), "--seed", str(a.seed),
          "--config", str(cfg)], w / "volumes" / "manifest.json")
    _run(["g3n_tokenizer.cli", "encode", "--volumes", str(w / "volumes"), "--checkpoint", a.tokenizer,
          "--out", str(w / "latents"), "--overwrite"], w / "latents" / "manifest.json")
    _run(["g3n_tokenizer.cli", "decode", "--latents", str(w / "latents"), "--out", str(w / "recon"),
          "--format", "volumes", "--overwrite"], w / "recon" / "manifest.json")
    _run(["g3n_data.cli", "synth-anatomy", "--out", str(w / "spec"), "--geometry", "demo"], w / "spec" / "anatomy.yaml")
    # --generated is required by the command; the reconstructions stand in (their rows are not read)
    _run(["g3n_eval.cli", "anatomy", "--spec", str(w / "spec" / "anatomy.yaml"), "--real", str(w / "volumes"),
          "--generated", str(w / "recon"), "--recon", str(w / "recon"), "--out", str(w / "anatomy")],
         w / "anatomy" / "anatomy.json")
    doc = json.loads((w / "anatomy" / "anatomy.json").read_text())
    print(f"\n{'effect':40s} {'n':>9s} {'real diff':>10s} {'d':>6s} {'recon keeps':>11s} {'95 % interval':>16s} "
          f"{'slope':>6s} {'r':>5s}")
    for name, row in doc["results"]["effects"].items():
        rc = row.get("recon")
        if not rc:
            continue
        real = row["real"]
        if real["difference"] is None:  # no volume of the effect's modality or classes in this cohort
            continue
        lo, hi = (v if v is not None else float("nan") for v in rc["keeps_interval"])
        n = f"{real['n_from']}/{real['n_to']}" if "n_from" in real else str(real["n"])
        print(f"{name:40s} {n:>9s} {real['difference']:10.4f} {real['d']:6.2f} {row['recon_keeps']:11.0%} "
              f"{lo:7.0%} to {hi:5.0%} {rc['slope']:6.0%} {rc['r']:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
