"""Controllability (docs/method.md §5, Table 2a): does the generator give what was asked for?

A probe trained on *real* embeddings scores generated samples after they are decoded and
re-encoded by the MAE encoder (exactly how real volumes are embedded). For a condition and a
class pair (or the 4-way modality task) these columns are reported:

* **real**: the probe's cross-validated agreement and AUC on real samples (its ceiling), with a
  permutation test (:func:`real_null`): a probe that does not beat shuffled labels is *blind* and
  cannot judge generated samples either way;
* **cond**: agreement of the probe with the *requested* class on samples generated with that
  request (and the AUC of the probe score against the request);
* **null**: samples generated with the condition left out (the null embedding): the class the
  probe mostly assigns and its fraction -- what the model does when not asked;
* **prior**: the real training set's majority class among the task's classes and its
  fraction -- what a generator that ignores the request would hit by chance.
* **recon** (given the tokenizer's reconstructions of the real volumes): the real column's probes
  scoring the reconstructions of the volumes they held out -- whether the probe still sees the
  task once a volume has been decoded, which decoded samples need (:func:`recon_column`).

Continuous conditions (age) get a sweep: requested vs probe-predicted value, slope and Pearson r.

When requests share their noise (``g3n-dit sample --paired``: sample j of every request starts
from seed + j), a task also gets a **paired** column. Samples with the same seed and the same other
conditions differ only in the requested class, so the change of the probe's score between them is
the request's effect alone; between unpaired samples it is buried under the spread of the noise.
It reports how many such groups moved toward the requested class and a one-sided sign test; a sweep
gets the slope within each group. The pure functions here take predictions; :func:`evaluate` fits
the probes with g3n-probe.

The package, by seam: :mod:`.columns` (the columns from probe outputs, pure), :mod:`.realcv`
(cross-validated predictions on real data), :mod:`.permutation` (the real column's permutation
test and the blind rule), :mod:`.reconstructions` (the recon columns), :mod:`.evaluate` (fitting
the probes, one row per task), :mod:`.command` and :mod:`.figures` (``g3n-eval controllability``).
"""

from .columns import (ClassTask, _direction, _groups, _majority, _norm, class_controllability, paired_shifts,
                      paired_sweep, pairing_key, value_sweep)
from .command import PAPER_TASKS, SPACES, latent_features, run_controllability
from .evaluate import MATCH_FIELDS, class_row, evaluate, real_slice, sweep_row
from .figures import sweep_montages
from .permutation import BLIND_AUC, BLIND_P, PERMUTATION_MAX_SUBJECTS, is_blind, real_null, real_permutation
from .realcv import cv_predictions, real_cv
from .reconstructions import recon_column, recon_sweep

__all__ = [
    "BLIND_AUC", "BLIND_P", "ClassTask", "MATCH_FIELDS", "PAPER_TASKS", "PERMUTATION_MAX_SUBJECTS", "SPACES",
    "_direction", "_groups", "_majority", "_norm", "class_controllability", "class_row", "cv_predictions",
    "evaluate", "is_blind", "latent_features", "paired_shifts", "paired_sweep", "pairing_key", "real_cv",
    "real_null", "real_permutation", "real_slice", "recon_column", "recon_sweep", "run_controllability",
    "sweep_montages", "sweep_row", "value_sweep",
]  # fmt: skip
