"""Does a brain-age probe read a tokenizer's reconstructions as it reads the real volumes?

The probe-read figures of the demo on decoded volumes (the age sweep, the decoded real follow-ups)
depend on what of the probe's features survives reconstruction. This reads the held-out real T1
volumes of a demo run, and their reconstructions by each given MAE-CNN tokenizer (encode, decode,
the real brain mask), with a brain-age ridge (penalty by GCV, as `g3n-eval forecast` fits its own)
on the shipped or given MAE's token means, fitted two ways: on every real volume with an age (as
the demo's forecast check does, the held-out volumes included) and on the train split's T1 volumes
only. Prints, per fit and per reader: the age error, bias, slope and correlation against the true
age, how many held-out follow-up pairs read older than their first visit, and how far each
reconstruction's reading is from the real volume's.

    uv run python tools/decoded_age_readout.py RUN --tokenizer shipped=ZOO/mae-cnn/tokenizer.safetensors \\
        --tokenizer stage1=OLD.safetensors [--mae ZOO/mae]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from g3n_mae.checkpoint import load_model
from g3n_mae.data import zscore_brain_torch
from g3n_eval.forecast import followup_pairs
from g3n_shards import ShardSet
from g3n_tokenizer.interface import zscore_brain
from g3n_tokenizer.mae_cnn import MaeCnnTokenizer
from sklearn.linear_model import RidgeCV


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a g3n-demo run folder (volumes, volumes-train, volumes-test)")
    p.add_argument("--tokenizer", action="append", required=True, metavar="NAME=PATH",
                   help="an MAE-CNN tokenizer whose reconstructions to read (repeatable)")
    p.add_argument("--mae", help="g3n-mae weights of the probe's features (default: the shipped MAE)")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.mae is None:
        import g3n_zoo

        a.mae = str(g3n_zoo.get("mae").path)
    mae, _, _ = load_model(a.mae)
    toks = {n: MaeCnnTokenizer.from_checkpoint(path) for n, path in (t.split("=", 1) for t in a.tokenizer)}

    def features(z: np.ndarray) -> np.ndarray:
        """The token mean of the encoder's output (what g3n-mae encode stores) of a z-scored volume."""
        x = zscore_brain_torch(torch.from_numpy(np.ascontiguousarray(z, np.float32))[None, None])
        return mae.encode(x)[0].mean(0).numpy()

    def z_of(s) -> np.ndarray:
        return zscore_brain(np.asarray(s.arrays[next(iter(s.arrays))], np.float32), s.key)[0]

    real = {s.key: (s.meta, features(z_of(s))) for s in ShardSet.open(f"{a.run}/volumes") if s.meta.age is not None}
    train = set(ShardSet.open(f"{a.run}/volumes-train").keys())
    test = [s for s in ShardSet.open(f"{a.run}/volumes-test") if s.meta.modality == "T1" and s.meta.age is not None]
    read: dict[str, list[np.ndarray]] = defaultdict(list)
    for s in test:
        z = z_of(s)
        read["real"].append(real[s.key][1])
        for name, tok in toks.items():
            r = tok.decode(tok.encode(torch.from_numpy(z)[None, None]))[0, 0].numpy() * (z != 0)
            read[name].append(features(r))
    ages = np.array([s.meta.age for s in test])
    index = {s.key: i for i, s in enumerate(test)}  # the follow-up pairs g3n-eval forecast checks
    pairs = [(index[k0], index[k1]) for k0, k1, _ in followup_pairs(list(index), [s.meta.model_dump() for s in test])]
    fits = {"every real volume with an age (as the demo's forecast check)": list(real),
            "the train split's T1 volumes": [k for k, (m, _) in real.items() if k in train and m.modality == "T1"]}
    print(f"{len(test)} held-out T1 volumes, {len(pairs)} follow-up pairs; MAE features from {a.mae}")
    for label, keys in fits.items():
        X = np.stack([real[k][1] for k in keys])
        mu, sd = X.mean(0), X.std(0) + 1e-12
        probe = RidgeCV(alphas=np.logspace(-3, 4, 30)).fit((X - mu) / sd, [real[k][0].age for k in keys])
        print(f"\nprobe fitted on {label}: {len(keys)} volumes, alpha {probe.alpha_:.3g}")
        base = None
        for name, F in read.items():
            pred = probe.predict((np.stack(F) - mu) / sd)
            base = pred if base is None else base
            err = pred - ages
            older = sum(pred[j] > pred[i] for i, j in pairs)
            print(f"  {name:10s} MAE {np.abs(err).mean():5.2f} y, bias {err.mean():+6.2f}, slope {np.polyfit(ages, pred, 1)[0]:.2f}, "
                  f"r {np.corrcoef(ages, pred)[0, 1]:.2f}; follow-ups read older {older}/{len(pairs)}; "
                  f"from the real volume's reading: mean |diff| {np.abs(pred - base).mean():.2f} y")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
