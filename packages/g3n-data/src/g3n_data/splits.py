"""Subject-level train/val/test splits (``g3n-data split``).

Why subject-level: several visits or modalities of one person are near-duplicates; if they
land in different splits a model is tested on people it was trained on. Every volume of a
subject therefore goes to the subject's split, and the subject is identified by
``(cohort, subject)`` (subject IDs are only unique within a cohort).

Stratification: subjects are grouped into strata by ``(cohort, diagnosis)``, the diagnosis
being the one at the subject's first session (youngest age, then session, then key), so a
converter (MCI -> AD) is stratified by what it was at baseline. A stratum smaller than
``min_stratum`` subjects (default: enough for one subject in the smallest split, i.e.
ceil(1 / smallest fraction)) is merged into its cohort's pooled stratum, and a pooled stratum
still too small into one global pool. Within a stratum subjects are shuffled by an RNG seeded
from (seed, stratum name) and allotted by largest remainder, carrying the rounding across strata
so the global proportions stay within one subject of the target. The result depends only on
the set of (key, metadata) pairs and the seed, not on their order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from g3n_shards import SampleMeta

FORMAT = "g3n-splits"
VERSION = 1
DEFAULT_NAMES = ("train", "val", "test")


@dataclass
class SplitResult:
    """Which split every subject and key is in, and how the strata were allotted."""

    fractions: dict[str, float]
    seed: int
    min_stratum: int
    subjects: dict[str, str]  # subject id -> split
    keys: dict[str, list[str]]  # split -> sorted keys
    strata: dict[str, dict[str, int]]  # stratum used -> split -> subjects
    merged: dict[str, str] = field(default_factory=dict)  # original stratum -> stratum used (only if merged)
    source: dict[str, Any] | None = None

    def split_of_key(self) -> dict[str, str]:
        return {k: s for s, ks in self.keys.items() for k in ks}

    def counts(self) -> dict[str, dict[str, int]]:
        subj = defaultdict(int)
        for s in self.subjects.values():
            subj[s] += 1
        return {s: {"subjects": subj[s], "volumes": len(self.keys[s])} for s in self.fractions}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "seed": self.seed, "fractions": self.fractions,
            "group_by": ["cohort", "subject"], "stratify_by": ["cohort", "diagnosis"], "min_stratum": self.min_stratum,
            "source": self.source, "counts": self.counts(), "strata": self.strata, "merged": self.merged,
            "subjects": self.subjects, "keys": self.keys,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "splits") -> "SplitResult":
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise ValueError(f"{where}: not a {FORMAT} v{VERSION} file (format={d.get('format')!r}, version={d.get('version')!r})")
        try:
            return cls(fractions=dict(d["fractions"]), seed=int(d["seed"]), min_stratum=int(d["min_stratum"]),
                       subjects=dict(d["subjects"]), keys={k: list(v) for k, v in d["keys"].items()},
                       strata=dict(d["strata"]), merged=dict(d.get("merged") or {}), source=d.get("source"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed splits file ({e!r})") from None


def subject_id(meta: SampleMeta) -> str:
    """The grouping unit: subject IDs are unique within a cohort only."""
    return f"{meta.cohort or '-'}/{meta.subject}"


def parse_fractions(text: str | Sequence[float], names: Sequence[str] = DEFAULT_NAMES) -> dict[str, float]:
    """'0.8,0.1,0.1' -> {'train': 0.8, 'val': 0.1, 'test': 0.1}; must be >= 0 and sum to 1."""
    try:
        vals = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise ValueError(f"fractions {text!r}: expected comma-separated numbers such as 0.8,0.1,0.1") from None
    if len(vals) != len(names):
        raise ValueError(f"fractions {text!r}: {len(vals)} values for {len(names)} splits {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique, got {list(names)}")
    if any(v < 0 or not math.isfinite(v) for v in vals) or abs(sum(vals) - 1.0) > 1e-6 or max(vals) <= 0:
        raise ValueError(f"fractions {text!r}: must be non-negative and sum to 1")
    return dict(zip(names, vals))


def _stratum_rng(seed: int, name: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed), h]))


def _baseline_diagnosis(metas: list[tuple[str, SampleMeta]]) -> str:
    ordered = sorted(metas, key=lambda km: (km[1].age is None, km[1].age or 0.0, km[1].session or "", km[0]))
    for _, m in ordered:
        if m.diagnosis is not None:
            return m.diagnosis
    return "unknown"


def split_subjects(
    items: Iterable[tuple[str, SampleMeta]],
    fractions: Mapping[str, float] | str = "0.8,0.1,0.1",
    seed: int = 2025,
    min_stratum: int | None = None,
) -> SplitResult:
    """Assign every subject (and so every key) to one split. Pure: no I/O."""
    fr = parse_fractions(fractions) if isinstance(fractions, str) else parse_fractions(list(fractions.values()), list(fractions))
    names = list(fr)
    positive = [v for v in fr.values() if v > 0]
    if min_stratum is None:
        min_stratum = int(math.ceil(1.0 / min(positive) - 1e-9))
    by_subject: dict[str, list[tuple[str, SampleMeta]]] = defaultdict(list)
    seen: set[str] = set()
    for key, meta in items:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
        by_subject[subject_id(meta)].append((key, meta))
    if not by_subject:
        raise ValueError("no samples to split")

    # strata, then merging of small ones: (cohort, dx) -> (cohort, *) -> (*, *)
    original: dict[str, str] = {}
    for sid, kms in by_subject.items():
        cohort = kms[0][1].cohort or "-"
        original[sid] = f"{cohort}|{_baseline_diagnosis(kms)}"
    size = defaultdict(int)
    for s in original.values():
        size[s] += 1
    level1 = {sid: (s if size[s] >= min_stratum else s.split("|")[0] + "|*") for sid, s in original.items()}
    size1 = defaultdict(int)
    for s in level1.values():
        size1[s] += 1
    used = {sid: (s if size1[s] >= min_stratum else "*|*") for sid, s in level1.items()}
    merged = {original[sid]: used[sid] for sid in used if used[sid] != original[sid]}

    members: dict[str, list[str]] = defaultdict(list)
    for sid in sorted(used):
        members[used[sid]].append(sid)

    # allot per stratum with the rounding carried across strata (systematic allocation)
    assigned_total = {n: 0 for n in names}
    seen_total = 0
    assignment: dict[str, str] = {}
    strata_counts: dict[str, dict[str, int]] = {}
    for stratum in sorted(members):
        sids = members[stratum]
        perm = _stratum_rng(seed, stratum).permutation(len(sids))
        sids = [sids[i] for i in perm]
        seen_total += len(sids)
        want = {n: fr[n] * seen_total - assigned_total[n] for n in names}  # what each split is owed so far
        counts = {n: max(0, int(math.floor(want[n]))) for n in names}
        while sum(counts.values()) > len(sids):  # can only happen through float error
            counts[max(counts, key=lambda n: (counts[n], n))] -= 1
        rem = len(sids) - sum(counts.values())
        for n in sorted(names, key=lambda n: (-(want[n] - counts[n]), names.index(n)))[:rem]:
            counts[n] += 1
        pos = 0
        for n in names:
            for sid in sids[pos: pos + counts[n]]:
                assignment[sid] = n
            pos += counts[n]
            assigned_total[n] += counts[n]
        strata_counts[stratum] = counts

    # every split with a positive fraction gets a subject when there are enough subjects
    need = [n for n in names if fr[n] > 0 and assigned_total[n] == 0]
    for n in need:
        donor = max(names, key=lambda d: (assigned_total[d], -names.index(d)))
        if assigned_total[donor] <= 1:
            break
        sid = sorted((s for s in assignment if assignment[s] == donor), key=lambda s: _stratum_rng(seed, s).random())[0]
        assignment[sid] = n
        assigned_total[donor] -= 1
        assigned_total[n] += 1
        strata_counts[used[sid]][donor] -= 1
        strata_counts[used[sid]][n] += 1

    keys = {n: [] for n in names}
    for sid, kms in by_subject.items():
        keys[assignment[sid]].extend(k for k, _ in kms)
    keys = {n: sorted(v) for n, v in keys.items()}
    return SplitResult(fractions=fr, seed=int(seed), min_stratum=min_stratum, subjects=dict(sorted(assignment.items())),
                       keys=keys, strata=strata_counts, merged=dict(sorted(merged.items())))  # fmt: skip


def load_splits(path: str | Path) -> SplitResult:
    """Read a splits.json written by ``g3n-data split``."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    return SplitResult.from_dict(d, where=str(p))


def write_splits(result: SplitResult, path: str | Path) -> None:
    """Atomic write (temp file + rename)."""
    from g3n_shards import atomic_write_bytes

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, json.dumps(result.to_dict(), indent=1, sort_keys=False).encode() + b"\n")


def _handler(args: argparse.Namespace) -> int:
    import g3n_shards as gs

    try:
        names = [n.strip() for n in args.names.split(",")]
        fr = parse_fractions(args.fractions, names)
        ss = gs.ShardSet.open(args.inp)
        meta = ss.metadata()
        result = split_subjects(sorted(meta.items()), fr, seed=args.seed, min_stratum=args.min_stratum)
    except (ValueError, gs.ShardError, OSError) as e:
        print(f"g3n-data split: {e}", file=sys.stderr)
        return 2
    result.source = {"path": str(args.inp), "kind": ss.kind, "digest": ss.digest, "num_samples": len(ss)}
    write_splits(result, args.out)
    for n, c in result.counts().items():
        print(f"{n:>8}: {c['subjects']:5d} subjects {c['volumes']:6d} volumes")
    if result.merged:
        print(f"merged {len(result.merged)} small strata (< {result.min_stratum} subjects): "
              + ", ".join(f"{a} -> {b}" for a, b in result.merged.items()))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """Register ``g3n-data split``."""
    p = subparsers.add_parser(
        "split",
        help="subject-level train/val/test split of a shard set, stratified by cohort and diagnosis",
        description="Assign every subject of a shard set (and so all its volumes) to one split, stratified by "
        "(cohort, baseline diagnosis); small strata are merged. Seeded and order-independent.",
    )
    p.add_argument("--in", dest="inp", required=True, help="shard set folder (any kind: its index is read)")
    p.add_argument("--out", required=True, type=Path, help="splits JSON to write")
    p.add_argument("--fractions", default="0.8,0.1,0.1", help="comma-separated fractions summing to 1 (default 0.8,0.1,0.1)")
    p.add_argument("--names", default=",".join(DEFAULT_NAMES), help="split names (default train,val,test)")
    p.add_argument("--seed", type=int, default=2025, help="random seed (default 2025)")
    p.add_argument("--min-stratum", type=int, default=None,
                   help="strata with fewer subjects are merged (default ceil(1/smallest fraction))")
    p.set_defaults(func=_handler)
