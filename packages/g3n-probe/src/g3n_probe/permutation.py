"""Permutation test of a probe score: is it above what the same protocol gets with no signal?

A constant predictor (the ``chance`` column) says where a probe that learned nothing would
land on average. With a few dozen subjects a probe that learned nothing lands far from that
average by luck: fold AUCs of a label the features do not carry spread over roughly 0.3-0.7
on 35 subjects, and strongly clustered features (sites, sexes) make the spread wider. The
permutation test answers the question the average cannot: re-run the whole cross-validation
with the labels shuffled, many times, and count how often the shuffled score is as good as
the real one (p = (1 + that count) / (1 + permutations), Phipson & Smyth 2010).

What is shuffled is chosen so that a shuffle is as likely as the real labels under "the
features carry no information about the label", and nothing else changes:

- *Subjects, not volumes*, exchange labels: a subject's sessions stay together, so a label
  constant within a subject (sex, IDH1) stays constant, and one that varies (age across
  visits, modality across a session's scans) keeps its within-subject pattern.
- A subject exchanges only with subjects that have as many units in the slice (whole-block
  exchangeability, Winkler et al. 2015): label sequences of equal length swap whole.
- The received sequence is then shuffled among the subject's own units (within-block
  exchangeability). Without it a label that varies inside subjects but always the same way
  (every glioma subject has one T1, T1c, T2 and FLAIR scan) would never move, and the test
  would say the modality probe could score 0.83 AUC on shuffled labels.
- The folds are the real run's folds (stratified on the real labels) and stay fixed.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

#: metrics where lower is better; every other metric counts higher as better
LOWER_IS_BETTER = frozenset({"mae", "rmse"})


def block_permutation(subjects: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """Index array ``src``: unit i takes the label of unit ``src[i]``.

    Each subject receives the labels of the units of a subject with the same number of units
    (itself included), in a random order among its own units.
    """
    subj = np.asarray(subjects, dtype=object).astype(str)
    units: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(subj.tolist()):
        units[s].append(i)
    by_size: dict[int, list[str]] = defaultdict(list)
    for s in sorted(units):
        by_size[len(units[s])].append(s)
    src = np.arange(len(subj))
    for size in sorted(by_size):
        names = by_size[size]
        donors = [names[j] for j in rng.permutation(len(names))]
        for s, d in zip(names, donors):
            src[units[s]] = np.asarray(units[d])[rng.permutation(size)]
    return src


def slice_seed(seed: int, task: str, slice_name: str) -> int:
    """A seed for one (task, slice) that does not depend on which other slices are tested."""
    return (int(seed) * 1_000_003 + zlib.crc32(f"{task}/{slice_name}".encode())) % 2**32


def p_value(observed: float, null: Sequence[float], metric: str) -> float:
    """One-sided permutation p-value: how often the shuffled labels scored at least as well."""
    vals = np.asarray([v for v in null if not math.isnan(v)], dtype=np.float64)
    if math.isnan(observed) or len(vals) == 0:
        return math.nan
    as_good = vals <= observed if metric in LOWER_IS_BETTER else vals >= observed
    return float((1 + int(as_good.sum())) / (1 + len(vals)))


def null_bound(null: Sequence[float], metric: str, level: float = 0.05) -> float:
    """The score a probe must beat for p < ``level``: the null's upper (or, for errors, lower) quantile."""
    vals = np.asarray([v for v in null if not math.isnan(v)], dtype=np.float64)
    if len(vals) == 0:
        return math.nan
    q = level if metric in LOWER_IS_BETTER else 1.0 - level
    return float(np.quantile(vals, q))
