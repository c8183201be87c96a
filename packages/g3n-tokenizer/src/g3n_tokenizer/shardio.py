"""Shard-level encode and decode: ``volumes`` -> ``latents`` -> ``volumes`` or NIfTI.

* :func:`encode_set` z-scores each volume over its brain voxels, encodes it, and writes a
  ``latents`` set whose manifest names the tokenizer (registry name, checkpoint SHA-256, config:
  everything :func:`g3n_tokenizer.registry.load_tokenizer` needs), the parent volumes set by
  digest, and the geometry (token grid, channels, plus the volumes' spacing/affine/space). Each
  sample keeps its metadata, with the z-scoring mean/std added to ``meta.extra`` so decoded volumes
  can be mapped back to scanner intensities. Unusable volumes go to ``rejects.jsonl``.
* :func:`decode_set` loads the tokenizer named by the latents manifest (checking the checkpoint
  digest), refuses latents that do not fit it, and writes either a ``volumes`` set or one NIfTI
  file per sample in atlas space with the atlas affine. Decoded intensities are in the z-scored
  space (``manifest.extra["intensity"] == "zscored-brain"``), as the tokenizer reconstructs them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

import g3n_shards as gs

from . import __version__
from .base import volume_geometry_from
from .errors import LatentError, TokenizerError
from .interface import ZSCORE_MEAN, ZSCORE_STD, Tokenizer, check_latents, zscore_brain
from .registry import load_tokenizer

INTENSITY = "zscored-brain"
LATENT_LAYOUT = "tokens (N, C): C-order over geometry.token_grid, C = geometry.channels"


def _producer(config: dict[str, Any]) -> gs.Producer:
    return gs.Producer(package="g3n-tokenizer", version=__version__, config=config)


def latents_geometry(tok: Tokenizer, volumes_geometry: gs.Geometry | None) -> gs.Geometry:
    """The tokenizer's geometry with the volumes' spacing/affine/space (which the tokenizer may lack)."""
    g = tok.geometry.model_dump()
    for k, v in volume_geometry_from(volumes_geometry).items():
        g[k] = v
    return gs.Geometry(**g)


def encode_set(tok: Tokenizer, volumes: str | Path | gs.ShardSet, out_dir: str | Path, batch_size: int = 2,
               keys: list[str] | None = None, overwrite: bool = False, progress: bool = True,
               max_shard_samples: int | None = None) -> gs.Manifest:
    """Encode a ``volumes`` set into a ``latents`` set (see module doc). Returns the manifest."""
    ss = volumes if isinstance(volumes, gs.ShardSet) else gs.ShardSet.open(volumes, kind="volumes")
    ref = tok.model_ref()
    if not ref.checkpoint_digest:
        raise TokenizerError(f"tokenizer {tok.name!r} has no checkpoint: save it (or load it from one) before encoding, "
                             f"so the latents can name it")
    shape = tuple(tok.geometry.shape or ())
    vg = ss.manifest.geometry
    if vg.shape is not None and tuple(vg.shape) != shape:
        raise TokenizerError(f"{ss.location}: volumes of shape {tuple(vg.shape)}, tokenizer {tok.name!r} expects {shape}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rejects = gs.RejectLog(out)
    wanted = None if keys is None else set(keys)
    if wanted is not None:
        missing = sorted(wanted - set(ss.keys()))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise LatentError(f"{ss.location}: no sample with key(s) {', '.join(missing[:5])}{more}")
    total = len(wanted) if wanted is not None else len(ss)
    geometry = latents_geometry(tok, vg)
    extra = {"intensity": INTENSITY, "latent_layout": LATENT_LAYOUT,
             "zscore": f"meta.extra.{ZSCORE_MEAN} / meta.extra.{ZSCORE_STD}: brain (>0) mean/std of each source volume"}
    writer_kw: dict[str, Any] = {"max_shard_samples": max_shard_samples} if max_shard_samples else {}
    with gs.ShardWriter(out, kind="latents", producer=_producer({"batch_size": batch_size, "tokenizer": ref.name}),
                        geometry=geometry, parents=[ss], tokenizer=ref, vocab=ss.manifest.vocab or None,
                        extra=extra, overwrite=overwrite, **writer_kw) as w:
        bar = tqdm(total=total, desc=f"encode ({tok.name})", unit="vol", disable=not progress)
        for batch in _zscored_batches(ss, wanted, batch_size, shape, rejects):
            z = tok.encode(torch.from_numpy(np.stack([b[1] for b in batch]))[:, None]).cpu().numpy()
            for (key, _, mean, std, meta), lat in zip(batch, z, strict=True):
                m = meta.model_copy(update={"extra": {**meta.extra, ZSCORE_MEAN: mean, ZSCORE_STD: std}})
                w.write(key, m, {"latent": np.ascontiguousarray(lat, dtype=np.float32)})
            bar.update(len(batch))
        bar.close()
    assert w.manifest is not None
    return w.manifest


def _zscored_batches(ss: gs.ShardSet, wanted: set[str] | None, batch_size: int, shape: tuple[int, ...],
                     rejects: gs.RejectLog) -> Iterator[list[tuple[str, np.ndarray, float, float, gs.SampleMeta]]]:
    buf: list[tuple[str, np.ndarray, float, float, gs.SampleMeta]] = []
    for s in ss.iter_split(shuffle=False):
        if wanted is not None and s.key not in wanted:
            continue
        vol = s.arrays["volume"]
        try:
            if tuple(vol.shape) != tuple(shape):
                raise ValueError(f"volume shape {tuple(vol.shape)} != tokenizer shape {tuple(shape)}")
            z, mean, std = zscore_brain(vol, s.key)
        except ValueError as e:
            rejects.add(f"{ss.location}:{s.key}", s.meta.subject, "encode", str(e))
            continue
        buf.append((s.key, z, mean, std, s.meta))
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------


def check_latent_set(ss: gs.ShardSet, tok: Tokenizer) -> None:
    """Refuse a latents set that was not made for this tokenizer's latent shape, before decoding anything."""
    g = ss.manifest.geometry
    n, c = tok.latent_shape
    if g.channels is not None and int(g.channels) != int(c):
        raise LatentError(f"{ss.location}: latents have {g.channels} channels, tokenizer {tok.name!r} expects {c}")
    if g.num_tokens is not None and int(g.num_tokens) != int(n):
        raise LatentError(f"{ss.location}: latents have {g.num_tokens} tokens (grid {g.token_grid}), tokenizer "
                          f"{tok.name!r} expects {n}")
    info = ss.manifest.arrays.get("latent")
    if info is not None and info.shape and all(s is not None for s in info.shape) and tuple(info.shape) != (n, c):
        raise LatentError(f"{ss.location}: latent arrays of shape {tuple(info.shape)}, tokenizer {tok.name!r} expects {(n, c)}")


def nifti_affine(ss: gs.ShardSet, tok: Tokenizer, affine: Any = None) -> np.ndarray:
    """The atlas affine for NIfTI output: given > latents manifest > tokenizer's training volumes."""
    for cand in (affine, ss.manifest.geometry.affine, tok.geometry.affine):
        if cand is not None:
            a = np.asarray(cand, dtype=np.float64)
            if a.shape != (4, 4):
                raise ValueError(f"affine must be 4x4, got {a.shape}")
            return a
    raise TokenizerError(f"{ss.location}: no affine recorded (latents manifest or tokenizer); pass affine= / --affine-from")


def write_nifti(path: Path, volume: np.ndarray, affine: np.ndarray, spacing: Any = None) -> None:
    """Write one float32 NIfTI atomically (temp name with the same extension, then os.replace)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_mask(mask: np.ndarray | str | Path | None, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean brain mask of the tokenizer's volume shape (array or NIfTI path; > 0 = brain)."""
    if mask is None:
        raise TokenizerError("intensity 'original' needs a brain mask (mask= / --mask): decoded backgrounds are "
                             "not exactly 0, so the brain cannot be told from the mean intensity without one")
    where = str(mask) if not isinstance(mask, np.ndarray) else "mask array"
    if not isinstance(mask, np.ndarray):
        import nibabel as nib

        try:
            mask = np.asarray(nib.load(str(mask)).dataobj)
        except Exception as e:  # noqa: BLE001 - re-raised naming the file
            raise TokenizerError(f"{where}: cannot read brain mask ({e})") from None
    m = np.squeeze(np.asarray(mask)) > 0
    if m.shape != tuple(shape):
        raise TokenizerError(f"{where}: mask shape {m.shape} != volume shape {tuple(shape)}")
    if not m.any():
        raise TokenizerError(f"{where}: the brain mask is empty")
    return m


def to_original(z: np.ndarray, mask: np.ndarray, meta: gs.SampleMeta) -> tuple[np.ndarray, str]:
    """Decoded z-scored volume -> positive intensities inside ``mask`` (see :func:`decode_set`)."""
    mean, std = meta.extra.get(ZSCORE_MEAN), meta.extra.get(ZSCORE_STD)
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)) and std > 0:
        v, how, eps = z * float(std) + float(mean), "original", 1e-3 * float(std)
    else:
        v, how, eps = z - float(z[mask].min()), "shifted", 1e-3
    out = np.where(mask, np.maximum(v, eps), 0.0).astype(np.float32)
    return out, how


def decode_set(latents: str | Path | gs.ShardSet, out_dir: str | Path, fmt: Literal["volumes", "nifti"] = "volumes",
               tokenizer: Tokenizer | None = None, checkpoint: str | Path | None = None, batch_size: int = 2,
               affine: Any = None, keys: list[str] | None = None, overwrite: bool = False, progress: bool = True,
               map_location: str | torch.device = "cpu", intensity: Literal["zscored", "original"] = "zscored",
               mask: np.ndarray | str | Path | None = None) -> dict[str, Any]:
    """Decode a ``latents`` set to a ``volumes`` set or NIfTI files. Returns a summary dict.

    Per-sample bad latents (wrong shape, NaN/Inf) are refused into ``rejects.jsonl``; a set whose
    geometry does not fit the tokenizer is refused as a whole (:class:`LatentError`).

    ``intensity="original"`` maps back to scanner-like intensities inside a brain ``mask`` (array or
    NIfTI path, > 0 = brain; the atlas brain mask for atlas-space volumes), 0 outside: with each
    sample's recorded z-scoring mean/std (real latents), or else (synthetic latents) by the positive
    shift ``z - min(z in mask) + 1e-3``. Either map is positive and affine inside the mask, so
    z-scoring the output over voxels > 0 (as g3n-mae does) gives back the decoded z-scored volume.
    Which map was used is recorded per sample in ``meta.extra["intensity"]``.
    """
    ss = latents if isinstance(latents, gs.ShardSet) else gs.ShardSet.open(latents, kind="latents")
    tok = tokenizer if tokenizer is not None else load_tokenizer(ss.manifest, checkpoint=checkpoint, map_location=map_location)
    check_latent_set(ss, tok)
    brain = load_mask(mask, tuple(tok.geometry.shape or ())) if intensity == "original" else None
    if intensity not in ("zscored", "original"):
        raise ValueError(f"unknown intensity {intensity!r} (zscored | original)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rejects = gs.RejectLog(out)
    wanted = None if keys is None else set(keys)
    if wanted is not None:
        missing = sorted(wanted - set(ss.keys()))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise LatentError(f"{ss.location}: no sample with key(s) {', '.join(missing[:5])}{more}")
    tg = tok.geometry
    vg = ss.manifest.geometry
    vol_geometry = gs.Geometry(shape=tg.shape, spacing=vg.spacing or tg.spacing, affine=vg.affine or tg.affine,
                               space=vg.space or tg.space)
    ref = tok.model_ref()
    written: list[str] = []
    bar = tqdm(total=len(wanted) if wanted is not None else len(ss), desc=f"decode ({tok.name})", unit="vol",
               disable=not progress)

    def batches() -> Iterator[list[gs.Sample]]:
        buf: list[gs.Sample] = []
        for s in ss.iter_split(shuffle=False):
            if wanted is not None and s.key not in wanted:
                continue
            try:
                check_latents(s.arrays["latent"], tok.latent_shape, where=f"{ss.location}:{s.key}")
            except LatentError as e:
                rejects.add(f"{ss.location}:{s.key}", s.meta.subject, "decode", str(e))
                bar.update(1)
                continue
            buf.append(s)
            if len(buf) == batch_size:
                yield buf
                buf = []
        if buf:
            yield buf

    def decoded() -> Iterator[tuple[gs.Sample, np.ndarray]]:
        for batch in batches():
            x = tok.decode(torch.from_numpy(np.stack([s.arrays["latent"] for s in batch]))).cpu().numpy()
            for s, v in zip(batch, x, strict=True):
                if brain is None:
                    yield s, v[0]
                else:
                    vol, how = to_original(v[0], brain, s.meta)
                    meta = s.meta.model_copy(update={"extra": {**s.meta.extra, "intensity": how}})
                    yield dataclasses.replace(s, meta=meta), vol
            bar.update(len(batch))

    if fmt == "volumes":
        with gs.ShardWriter(out, kind="volumes", producer=_producer({"tokenizer": ref.name, "batch_size": batch_size}),
                            geometry=vol_geometry, parents=[ss], tokenizer=ref, overwrite=overwrite,
                            extra={"intensity": INTENSITY if brain is None else "original"}) as w:
            for s, v in decoded():
                w.write(s.key, s.meta, {"volume": v})
                written.append(s.key)
    elif fmt == "nifti":
        aff = nifti_affine(ss, tok, affine)
        index_lines = []
        for s, v in decoded():
            path = out / f"{s.key}.nii.gz"
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path}: exists; pass overwrite=True / --overwrite")
            write_nifti(path, v, aff)
            index_lines.append(json.dumps({"key": s.key, "file": path.name, "meta": s.meta.model_dump(mode="json")}, sort_keys=True))
            written.append(s.key)
        gs.atomic_write_bytes(out / "index.jsonl", ("\n".join(index_lines) + "\n").encode() if index_lines else b"")
        info = {"tokenizer": ref.model_dump(mode="json"), "latents": ss.manifest.digest,
                "intensity": INTENSITY if brain is None else "original",
                "affine": aff.tolist(), "files": len(written)}
        gs.atomic_write_bytes(out / "decoded.json", json.dumps(info, indent=1).encode() + b"\n")
    else:
        raise ValueError(f"unknown output format {fmt!r} (volumes | nifti)")
    bar.close()
    return {"written": len(written), "rejected": len(rejects.records()), "out": str(out), "format": fmt}
