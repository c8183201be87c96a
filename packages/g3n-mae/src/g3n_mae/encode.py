"""``g3n-mae encode``: the unmasked encoder over a ``volumes`` set -> a ``tokens`` set.

Per volume it stores the token grid (N x hidden, float16 on disk) and/or its mean over tokens
(hidden, float32), by ``store``. The output manifest names the encoder (checkpoint SHA-256, path
and model config) and the geometry (volume shape, patch size, token grid, channels = hidden).

Resumable and deterministic by construction: the work is cut along the *input shards* (part j
encodes input shard j, read as reader j of ``num_shards`` unshuffled readers), each part is
written as its own small tokens set under ``<out>/.parts/`` whose manifest appears only when the
part is complete, and a rerun skips complete parts. When all parts exist they are merged (key
order) into ``<out>``; the merge does not depend on how often the run was interrupted. Within a
part the batches are fixed, the model is in eval mode without masking, and no RNG is used.

Volumes that cannot be encoded (wrong shape, empty brain, NaN) get a ``rejects.jsonl`` line and
the run goes on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

import g3n_shards as gs

from . import __version__
from .checkpoint import load_model
from .data import DataError, check_volume, zscore_brain_torch

Store = Literal["tokens", "mean", "both"]
PARTS_DIR = ".parts"


def _arrays(tokens: torch.Tensor, store: Store) -> dict[str, np.ndarray]:
    t = tokens.float().cpu().numpy()
    out: dict[str, np.ndarray] = {}
    if store in ("tokens", "both"):
        out["tokens"] = t
    if store in ("mean", "both"):
        out["mean"] = t.mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


@torch.no_grad()
def encode_volume_set(
    weights: str | Path,
    volumes: str | Path,
    out_dir: str | Path,
    store: Store = "both",
    batch_size: int = 4,
    device: str | None = None,
    bf16: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> gs.Manifest:
    """Encode every volume of ``volumes`` with the encoder in ``weights``; write ``out_dir``.

    Args:
        weights: a g3n-mae weights file, export dir, checkpoint dir or run dir.
        volumes: a ``volumes`` shard set. Its geometry may differ from the checkpoint's (same patch
            size): the positional embedding is then interpolated to the set's token grid.
        store: ``tokens`` (N x hidden), ``mean`` (hidden) or ``both``.
        batch_size: volumes per forward pass.
        device: ``cuda``/``cpu``; default CUDA when available.
        bf16: autocast in bf16 (CUDA only); off by default for bit-stable output.
        overwrite: replace an existing complete output set.
    """
    if store not in ("tokens", "mean", "both"):
        raise ValueError(f"store must be tokens | mean | both, not {store!r}")
    out = Path(out_dir)
    if (out / gs.MANIFEST_NAME).exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already holds a complete tokens set; pass overwrite=True (--overwrite) to redo it")
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    ss = gs.ShardSet.open(volumes, kind="volumes", stored_dtype=True)  # float16 as stored; z-scored on the device
    geo = ss.manifest.geometry
    shape = tuple(geo.shape) if geo.shape is not None else None
    model, cfg, digest = load_model(weights, img_size=shape, encoder_only=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(dev)
    use_bf16 = bf16 and dev.type == "cuda"

    encoder_ref = gs.ModelRef(
        name="g3n-mae", checkpoint_digest=digest, checkpoint_path=str(weights),
        config=cfg.model_dump(mode="json"),
    )
    geometry = gs.Geometry(
        shape=cfg.img_size, spacing=geo.spacing, patch_size=cfg.patch_size, channels=cfg.embed_dim,
        affine=geo.affine, space=geo.space,
    )
    producer = gs.Producer(
        package="g3n-mae", version=__version__,
        config={"command": "encode", "store": store, "batch_size": batch_size, "bf16": use_bf16},
    )

    parts_root = out / PARTS_DIR
    n_shards = len(ss.manifest.shards)
    bar = tqdm(total=len(ss), desc="encode", unit="vol", disable=not progress)
    part_dirs = []
    for j in range(n_shards):
        pdir = parts_root / f"part-{j:06d}"
        part_dirs.append(pdir)
        if (pdir / gs.MANIFEST_NAME).is_file():
            done = gs.ShardSet.open(pdir, kind="tokens")
            if done.manifest.encoder is None or done.manifest.encoder.checkpoint_digest != digest:
                raise gs.ShardError(f"{pdir}: a part from another encoder checkpoint; remove {parts_root} to restart")
            bar.update(ss.manifest.shards[j].samples)
            continue
        (pdir / gs.REJECTS_NAME).unlink(missing_ok=True)  # a killed attempt's rejects are redone with the part
        with gs.ShardWriter(pdir, kind="tokens", producer=producer, geometry=geometry, parents=[ss],
                            encoder=encoder_ref, overwrite=True) as w:
            rejects = gs.RejectLog(pdir / gs.REJECTS_NAME)
            batch: list[tuple[gs.Sample, np.ndarray]] = []

            def flush() -> None:
                x = zscore_brain_torch(torch.from_numpy(np.stack([v for _, v in batch])).unsqueeze(1).to(dev))
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    tokens = model.encode(x)
                for (s, _), tok in zip(batch, tokens):
                    w.write(s.key, s.meta, _arrays(tok, store))
                bar.update(len(batch))
                batch.clear()

            for s in ss.iter_split(rank=j, world_size=n_shards, worker=0, num_workers=1, shuffle=False):
                try:
                    vol = np.asarray(s.arrays["volume"])
                    if tuple(vol.shape) != tuple(cfg.img_size):
                        raise DataError(f"sample {s.key}: volume shape {tuple(vol.shape)} != encoder geometry {cfg.img_size}")
                    check_volume(vol, s.key)
                    batch.append((s, vol))
                except (DataError, KeyError) as e:
                    rejects.add(f"{ss.location}/{s.shard}", s.meta.subject, "encode", str(e), key=s.key)
                    bar.update(1)
                    continue
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
    bar.close()
    manifest = gs.merge_shard_sets(part_dirs, out, producer=producer, overwrite=True)
    shutil.rmtree(parts_root, ignore_errors=True)
    return manifest


def encode_summary(manifest: gs.Manifest) -> str:
    enc = manifest.encoder
    return json.dumps({
        "kind": manifest.kind, "samples": manifest.num_samples, "digest": manifest.digest,
        "encoder_sha256": enc.checkpoint_digest if enc else None,
        "token_grid": manifest.geometry.token_grid, "channels": manifest.geometry.channels,
    })
