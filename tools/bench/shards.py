"""Benchmark: shard read throughput and size vs. nibabel .nii.gz, one core.

Writes N volumes of 160x192x160 float32 with realistic content (the SRI24 brain from
g3n-data's shipped copy when present, else a synthetic brain-shaped object; each copy perturbed by a smooth
intensity scale and scanner-like noise inside the head, zero background), then reads them back:
- our format: a `volumes` shard set (float16 + zstd level 1), iterated with ShardSet;
- the same volumes as .nii.gz (float32, nibabel's default compression), nib.load + get_fdata.
Prints volumes/s, bytes/volume and the ratios. Target: >= 10x nibabel's read throughput at no
more bytes than .nii.gz.

    uv run python tools/bench/shards.py [-n 24] [--out runs/bench-shards]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

import g3n_shards as gs  # noqa: E402
from g3n_shards.testing import brain_like  # noqa: E402

SHAPE = (160, 192, 160)
#: the SRI24 skull-stripped T1 at 1 mm that g3n-data ships (the repository's copy, never ../shared)
ATLAS = Path(__file__).resolve().parents[2] / "packages" / "g3n-data" / "src" / "g3n_data" / "atlases" / "sri24"


def base_volume() -> tuple[np.ndarray, str]:
    """The SRI24 skull-stripped T1 cropped/padded to 160x192x160 (notes.md's box), or a phantom."""
    path = ATLAS / "t1_brain_1mm.nii.gz"
    if path.is_file():
        v = np.asarray(nib.load(path).dataobj, dtype=np.float32).squeeze()
        out = np.zeros(SHAPE, np.float32)  # centre crop / pad to the box
        src = [slice(max(0, (n - m) // 2), max(0, (n - m) // 2) + min(n, m)) for n, m in zip(v.shape, SHAPE)]
        dst = [slice(max(0, (m - n) // 2), max(0, (m - n) // 2) + min(n, m)) for n, m in zip(v.shape, SHAPE)]
        out[tuple(dst)] = v[tuple(src)]
        return np.clip(out, 0, None), f"SRI24 ({path.name}, shipped with g3n-data)"
    return brain_like(np.random.default_rng(0), SHAPE, scale=600.0), "synthetic brain-like object"


def variants(base: np.ndarray, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    head = base > 0
    x = np.linspace(-1, 1, SHAPE[0])[:, None, None]
    for i in range(n):
        bias = 1 + 0.1 * rng.uniform(-1, 1) * x  # smooth intensity scale, as a bias field
        noise = rng.normal(0, 0.02 * float(base[head].mean()), SHAPE).astype(np.float32)
        yield i, np.where(head, np.clip(base * bias + noise, 0, None), 0).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=24, help="number of volumes (default 24)")
    ap.add_argument("--out", default=None, help="scratch folder (default: a temp dir, removed after)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = ap.parse_args()
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    except (AttributeError, OSError):
        pass
    work = Path(args.out or tempfile.mkdtemp(prefix="g3n-bench-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    base, source = base_volume()

    shard_dir, nii_dir = work / "set", work / "nii"
    shutil.rmtree(shard_dir, ignore_errors=True)
    nii_dir.mkdir(exist_ok=True)
    with gs.ShardWriter(shard_dir, kind="volumes", producer=gs.Producer(package="g3n-shards", config={"bench": 1}),
                        geometry=gs.Geometry(shape=SHAPE, spacing=(1.0, 1.0, 1.0), patch_size=(16, 16, 16))) as w:
        for i, v in variants(base, args.n):
            m = gs.SampleMeta(subject=f"b{i:04d}", modality="T1", cohort="BENCH")
            w.write(gs.sample_key(m), m, {"volume": v})
            nib.save(nib.Nifti1Image(v, np.eye(4)), nii_dir / f"b{i:04d}.nii.gz")

    def read_shards(stored: bool = False) -> float:
        t = time.perf_counter()
        ss = gs.ShardSet.open(shard_dir, stored_dtype=stored)
        n = sum(1 for s in ss.iter_split(shuffle=False) if s.arrays["volume"].shape == SHAPE)
        assert n == args.n
        return time.perf_counter() - t

    def read_nii() -> float:
        t = time.perf_counter()
        for p in sorted(nii_dir.glob("*.nii.gz")):
            assert nib.load(p).get_fdata(dtype=np.float32).shape == SHAPE
        return time.perf_counter() - t

    read_shards(), read_nii()  # warm the page cache: we measure decoding, not the disk
    t_ours32, t_ours, t_nii = float("inf"), float("inf"), float("inf")
    for _ in range(3):  # interleaved, best of 3: the ratio is robust to a busy machine
        t_ours = min(t_ours, read_shards(stored=True))
        t_ours32 = min(t_ours32, read_shards())
        t_nii = min(t_nii, read_nii())
    b_ours = sum(s.bytes for s in gs.ShardSet.open(shard_dir).manifest.shards) / args.n
    b_nii = sum(p.stat().st_size for p in nii_dir.glob("*.nii.gz")) / args.n
    fig = {
        "volumes": args.n, "shape": list(SHAPE), "content": source,
        "ours_volumes_per_s": round(args.n / t_ours, 1), "nifti_volumes_per_s": round(args.n / t_nii, 1),
        "ours_float32_volumes_per_s": round(args.n / t_ours32, 1),
        "read_speedup": round(t_nii / t_ours, 1), "read_speedup_float32_out": round(t_nii / t_ours32, 1),
        "ours_bytes_per_volume": int(b_ours), "nifti_bytes_per_volume": int(b_nii),
        "size_ratio_ours_over_nifti": round(b_ours / b_nii, 3),
        "target_met": bool(t_nii / t_ours >= 10 and b_ours <= b_nii),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.json:
        print(json.dumps(fig))
    else:
        print(f"shard read benchmark: {args.n} volumes of {SHAPE} float32, content: {source}, 1 core")
        print(f"  g3n shards, float16 out    : {fig['ours_volumes_per_s']:8.1f} volumes/s  {b_ours / 1e6:6.2f} MB/volume")
        print(f"  g3n shards, float32 out    : {fig['ours_float32_volumes_per_s']:8.1f} volumes/s  (numpy float16->float32)")
        print(f"  nibabel .nii.gz (float32)  : {fig['nifti_volumes_per_s']:8.1f} volumes/s  {b_nii / 1e6:6.2f} MB/volume")
        print(f"  read speed-up {fig['read_speedup']}x (float32 out: {fig['read_speedup_float32_out']}x), size ratio {fig['size_ratio_ours_over_nifti']} "
              f"-> target (>=10x, <=1.0) {'MET' if fig['target_met'] else 'NOT met'}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
