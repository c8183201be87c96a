"""``g3n-eval controllability``: features in, ``controllability.json`` and figures out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .columns import ClassTask
from .evaluate import MATCH_FIELDS, evaluate
from .figures import sweep_montages
from .permutation import PERMUTATION_MAX_SUBJECTS


#: The rows of the paper's Table 2a, as (metadata field, classes).
PAPER_TASKS = ("diagnosis:HC,AD", "diagnosis:HC,MCI", "diagnosis:MCI,AD", "diagnosis:HC,PD", "sex:F,M",
               "modality:T1,T2,FLAIR,T1c", "idh1:wildtype,mutant")


#: Where the probes look. ``volume``: the paper's protocol (generated latents decoded, re-encoded
#: by the MAE encoder, probed like real embeddings). ``latent``: probes on the projected token
#: features themselves (real latents vs generated latents, mean over tokens, as in Table 5's
#: probe columns): what the generator controls, without the tokenizer's decoder in between.
SPACES = ("volume", "latent")


def latent_features(real: Any, generated: Any, limit: int | None = None) -> tuple[Any, Any]:
    """FeatureSets of two ``latents`` sets of one tokenizer: each sample's latent averaged over tokens."""
    from g3n_probe import load_features

    from ..data import InputError, open_set

    sets = {"real": open_set(real), "generated": open_set(generated)}
    for role, ss in sets.items():
        if ss.kind != "latents":
            raise InputError(f"{ss.location}: --space latent needs a latents set as {role}, got a {ss.kind} set")
    digests = {role: getattr(ss.manifest.tokenizer, "checkpoint_digest", None) for role, ss in sets.items()}
    if digests["real"] != digests["generated"]:
        raise InputError(f"{generated}: its latents come from tokenizer {digests['generated']}, the real ones in {real} from "
                         f"{digests['real']}: latent features are only comparable within one tokenizer")
    real_fs = load_features(real, latent_reduce="mean")
    gen_fs = load_features(generated, latent_reduce="mean")
    if limit is not None:
        gen_fs = gen_fs.subset(list(gen_fs.keys)[:limit])
    return real_fs, gen_fs


def run_controllability(real: Any, generated: Any, out: Any, tasks: Sequence[str] = PAPER_TASKS,
                        sweeps: Sequence[str] = ("age",), encoder: Any = None, tokenizers: Any = None,
                        protocol: Any = None, n_splits: int = 5, limit: int | None = None,
                        progress: bool = True, space: str = "volume", match: Sequence[str] = MATCH_FIELDS,
                        permutations: int = 0, permutation_max_subjects: int | None = PERMUTATION_MAX_SUBJECTS,
                        recon: Any = None) -> dict[str, Any]:
    """Table 2a from a real feature source and a generated set (tokens / feature table, or a
    latents set that is decoded through the registry and re-encoded by the MAE encoder); with
    ``space="latent"``, from a real and a generated latents set directly (:data:`SPACES`).
    ``recon``: the tokenizer's reconstructions of the real volumes (volumes set, re-encoded like the
    generated ones), for each row's ``recon`` column; volume space only."""
    from g3n_probe import protocol_preset

    from ..records import input_ref, write_metrics
    from ..sources import request_settings

    out = Path(out)
    protocol = protocol or protocol_preset("paper")
    parsed = [ClassTask.parse(t) for t in tasks]  # a bad --task fails before any decoding
    real_fs, gen_fs, gen_vols, recon_fs = _features(real, generated, recon, space, encoder, tokenizers, limit, progress)
    res = evaluate(real_fs, gen_fs, parsed, sweeps, protocol, n_splits, match, permutations, permutation_max_subjects,
                   recon_fs)
    fields = [*sweeps, *dict.fromkeys(t.field for t in parsed)]
    figures = sweep_montages(gen_vols, fields, out) if gen_vols is not None else {}
    settings = {
        "probe": {"kind": "g3n-probe linear (logistic / ridge)", "protocol": protocol.model_dump(mode="json"),
                  "real_cv_folds": n_splits, "real_permutations": permutations,
                  "real_permutation_max_subjects": permutation_max_subjects, "trained_on": "real features",
                  "matched_on": list(match)},
        "space": space,
        "generated_path": "decoded by the tokenizer and re-encoded by the MAE encoder" if gen_vols is not None
        else "latents averaged over tokens (no decoding)" if space == "latent" else "features given",
        "encoder": None if encoder is None else {"weights": encoder.weights, "digest": encoder.digest},
        "tokenizers": tokenizers.provenance() if tokenizers is not None else [],
        "generation": request_settings(gen_fs.records),
        "tasks": list(tasks), "sweeps": list(sweeps), "limit": limit,
        "arms": {"cond": "generated with the class requested", "null": "generated with the condition not requested",
                 "prior": "majority class of the real training set"},
    }
    inputs = [input_ref(real, "real features"), input_ref(generated, "generated")]
    if recon is not None:
        inputs.append(input_ref(recon, "reconstructed real volumes"))
    return write_metrics(out / "controllability.json", "controllability", settings, inputs, {**res, "figures": figures})


def _features(real: Any, generated: Any, recon: Any, space: str, encoder: Any, tokenizers: Any, limit: int | None,
              progress: bool) -> tuple[Any, Any, Any, Any]:
    """(real, generated, recon) FeatureSets and the generated volumes when they were decoded here."""
    from ..data import InputError
    from ..sources import features_of

    if space not in SPACES:
        raise InputError(f"space {space!r}: expected one of {', '.join(SPACES)}")
    if space == "latent":
        if recon is not None:
            raise InputError("--recon measures decoded volumes: it needs --space volume")
        return (*latent_features(real, generated, limit), None, None)
    real_fs, _ = features_of(real, encoder, tokenizers, None, progress)
    gen_fs, gen_vols = features_of(generated, encoder, tokenizers, limit, progress)
    recon_fs = None
    if recon is not None:
        recon_fs, _ = features_of(recon, encoder, tokenizers, None, progress)
        if not set(map(str, recon_fs.keys)) & set(map(str, real_fs.keys)):
            raise InputError(f"{recon}: none of its keys is a key of {real}: not reconstructions of these real volumes")
    return real_fs, gen_fs, gen_vols, recon_fs
