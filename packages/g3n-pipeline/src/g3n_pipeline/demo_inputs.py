"""The demo's inputs and the keys its stages read: the shipped IXI cohort, the subject-level
train/test subsets, the shipped models (g3n-zoo), and the latents a stage decodes or starts from."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from g3n_shards import ShardSet, subset_shard_set

from . import train_split
from .runner import StageFailed


def zoo_file(name: str) -> Path:
    """A training config shipped in g3n_pipeline/zoo/ (the shipped models' and the demo's), or a
    path given as such."""
    p = Path(name)
    return p if p.is_absolute() or p.is_file() else Path(str(resources.files("g3n_pipeline") / "zoo" / name))


def ixi_csv() -> Path:
    return Path(str(resources.files("g3n_pipeline") / "cohort" / "ixi10" / "ixi10.csv"))


#: the demo's held-out set: every subject outside the train split. The demo has no use for a
#: separate validation split (the tokenizer holds out its own share of train subjects), and the
#: larger test set holds enough real follow-up visits for the forecast check's sign test
TEST_SPLITS = ("val", "test")


def _split_subsets(run: Path, source: str, prefix: str) -> None:
    """Write PREFIX-train / PREFIX-test subsets of SOURCE following splits.json (by subject)."""
    from g3n_data.splits import load_splits

    splits = load_splits(run / "splits.json")
    src = ShardSet.open(run / source)
    have = set(src.keys())
    for name, parts in (("train", ("train",)), ("test", TEST_SPLITS)):
        keys = [k for part in parts for k in splits.keys.get(part, []) if k in have]
        out = run / f"{prefix}-{name}"
        subset_shard_set(src, keys, out, overwrite=True)


def _split_cohort(run: Path, check_zoo: bool) -> None:
    _split_subsets(run, "volumes", "volumes")
    if check_zoo:
        _check_zoo_data(run)


def _check_zoo_data(run: Path) -> None:
    """The shipped models may only start a run on the cohort they were trained on: on another one
    (other subjects, seed or scans) their training subjects could sit in this run's test split.
    The same cohort rendered on another CPU differs from the zoo's by rounding only, which the
    zoo's train-split fingerprint tells apart from another cohort (see train_split)."""
    import g3n_zoo

    mae = g3n_zoo.get("mae")
    # the train split as the build machine rendered it: the tokenizer's data (the MAE may have
    # pretrained on more subjects besides it)
    want = g3n_zoo.get("mae-cnn").card["data"]["digest"]
    ss = ShardSet.open(run / "volumes-train")
    if ss.digest == want:
        return
    fp = mae.folder / train_split.FILE_NAME
    problems = train_split.compare(train_split.read(fp), ss)[0] if fp.is_file() else [f"{fp}: missing"]
    if not problems:
        print(f"note: {run / 'volumes-train'} holds the samples and labels of the shipped models' train split, "
              f"and its volumes differ from theirs by rounding only (this CPU's vector arithmetic is not the "
              f"build machine's), so the shipped models start this run", flush=True)
        return
    raise StageFailed(f"{run / 'volumes-train'} ({ss.digest[:19]}...) is not the train split the shipped models were "
                      f"trained on ({want[:19]}...): {'; '.join(problems[:3])}"
                      f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Another cohort (subjects, "
                      f"seed, scans) could put their training subjects in this run's test split. Use --from-scratch "
                      f"for this cohort")


def shipped(name: str) -> Path:
    """The shipped model ``name`` (checked against the zoo's manifest), or a StageFailed saying what to do."""
    import g3n_zoo

    try:
        return g3n_zoo.get(name).path
    except g3n_zoo.ZooError as e:
        raise StageFailed(f"{e}\n  run `g3n-demo --from-scratch`, or rebuild the models with `g3n-zoo-build --pack`") from None


def shipped_table5() -> Path | None:
    """The shipped tokenizers' Table 5 in kind (the MAE-CNN beside the AutoencoderKL baseline, on this
    cohort's held-out split, measured when the zoo was built), if the zoo holds it."""
    import g3n_zoo

    try:
        path = g3n_zoo.get("autoencoderkl").folder / "table5.json"
    except g3n_zoo.ZooError:
        return None
    return path if path.is_file() else None


def recon_keys(latents: Path, heldout: Path, modalities: Sequence[str], n_heldout: int) -> list[str]:
    """Keys of the real latents worth decoding: the first visit of every subject in each of the given
    modalities (the anatomy effects are measured in them, on as many subjects as there are; later
    visits of a subject add little to a group difference and cost a decode each) and the first
    ``n_heldout`` held-out volumes in key order (what ``g3n-eval recon --limit`` scores)."""
    metas = ShardSet.open(latents).metadata()
    keys = set(_first_visits(metas, lambda m: m.modality in modalities))
    keys |= set(sorted(ShardSet.open(heldout).keys())[:n_heldout])
    missing = sorted(keys - set(metas))
    if missing:
        raise StageFailed(f"{latents}: held-out volume(s) {', '.join(missing[:3])} have no latent")
    return sorted(keys)


def first_visit_keys(latents: Path, modality: str, n: int, diagnosis: str | None = None) -> list[str]:
    """Keys of the first session of up to ``n`` subjects (deterministic: sorted by key)."""
    metas = ShardSet.open(latents).metadata()
    keys = sorted(_first_visits(metas, lambda m: m.modality == modality and m.age is not None
                                and not (diagnosis and m.diagnosis != diagnosis)))[:n]
    if not keys:
        raise StageFailed(f"{latents}: no {modality} latents{f' with diagnosis {diagnosis}' if diagnosis else ''} to start from")
    return keys


def _first_visits(metas: Mapping[str, Any], keep: Callable[[Any], bool]) -> list[str]:
    """Of the samples ``keep`` accepts, the key of each subject's earliest visit in each modality
    (by age, an unknown age last; ties by key)."""
    first: dict[tuple[str, str | None], tuple[float, str]] = {}
    for k, m in metas.items():
        if keep(m):
            visit = (m.age if m.age is not None else math.inf, k)
            first[(m.subject, m.modality)] = min(first.get((m.subject, m.modality), visit), visit)
    return [k for _, k in first.values()]
