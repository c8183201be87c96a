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
from g3n_shards import ShardSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="anatomy.yaml (g3n-data synth-anatomy)")
    ap.add_argument("volumes", nargs="+", help="volumes shard sets")
    ap.add_argument("--modality", default="T1")
    a = ap.parse_args()
    anatomy = Anatomy.load(a.spec)
    ageing = {e.signature: e.expect for e in anatomy.spec.effects if e.field == "age"}
    sessions: dict[str, list[tuple[float, dict[str, float]]]] = defaultdict(list)
    for path in a.volumes:
        for s in ShardSet.open(path):
            m = s.meta
            if m.modality != a.modality or m.age is None or m.subject is None:
                continue
            vol = np.asarray(next(iter(s.arrays.values())), dtype=np.float32).squeeze()
            sessions[f"{m.cohort}/{m.subject}"].append((float(m.age), anatomy.signatures(vol, s.key)))
    out: dict = {"spec": a.spec, "modality": a.modality, "subjects_with_followups": 0, "pairs": 0, "signatures": {}}
    changes: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for visits in sessions.values():
        if len(visits) < 2:
            continue
        visits.sort(key=lambda v: v[0])
        out["subjects_with_followups"] += 1
        (age0, sig0), later = visits[0], visits[1:]
        for age, sig in later:
            if age - age0 < 0.1:
                continue
            out["pairs"] += 1
            for name, v in sig.items():
                changes[name].append((age - age0, v - sig0[name]))
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
