"""How much of a cohort's ageing shows between visits, measured by an anatomy spec's signatures.

For every subject with two or more T1 sessions (by ``age`` in the metadata), each later session
is compared with the first: the change of each signature of the spec, per year, and how many
pairs moved the way the spec's ``age`` effect expects. This is the signal a longitudinal bridge
learns from and a forecast check can see; if few pairs move the expected way, neither can work.

    uv run g3n-data synth-anatomy --out runs/spec --geometry demo
    uv run python tools/followup_signatures.py runs/spec/anatomy.yaml runs/demo/volumes [--modality T1]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from g3n_eval.anatomy import Anatomy
from g3n_eval.forecast import followup_pairs
from g3n_shards import ShardSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="anatomy.yaml (g3n-data synth-anatomy)")
    ap.add_argument("volumes", nargs="+", help="volumes shard sets")
    ap.add_argument("--modality", default="T1")
    a = ap.parse_args()
    anatomy = Anatomy.load(a.spec)
    ageing = {e.signature: e.expect for e in anatomy.spec.effects if e.field == "age"}
    sets = [ShardSet.open(p) for p in a.volumes]
    metas = {k: m.model_dump(mode="json") for ss in sets for k, m in ss.metadata().items()}
    # the pairs g3n-eval forecast checks real ageing on: each subject's first session and each later one
    pairs = followup_pairs(list(metas), list(metas.values()), {a.modality})
    need = {k for first, later, _ in pairs for k in (first, later)}
    sig = {s.key: anatomy.signatures(np.asarray(next(iter(s.arrays.values())), dtype=np.float32).squeeze(), s.key)
           for ss in sets for s in ss if s.key in need}
    changes: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for first, later, dt in pairs:
        for name, v in sig[later].items():
            changes[name].append((dt, v - sig[first][name]))
    out: dict = {"spec": a.spec, "modality": a.modality, "subjects_with_followups": len({p[0] for p in pairs}),
                 "pairs": len(pairs), "signatures": {}}
    for name, rows in sorted(changes.items()):
        dt, d = np.array(rows).T
        rec = {"mean_change_per_year": round(float(np.mean(d / dt)), 5), "sd_of_change": round(float(np.std(d)), 5),
               "n_lower": int((d < 0).sum()), "n_higher": int((d > 0).sum())}
        if name in ageing:
            rec["age_effect_expects"] = ageing[name]
        out["signatures"][name] = rec
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
