"""Benchmark of g3n-eval's heavy pieces at paper geometry (CPU by default).

    uv run python tools/bench/eval.py [--device cuda] [--threads 2] [--inception-images 8]

Measures: 3D SSIM (+ MSE/PSNR, whole and masked) of one 160x192x160 pair; the Frechet distance
of 64 vs 64 Inception-sized (2048-d) features by the sqrtm route and by the exact low-rank route
(and that both agree); Inception-V3 pool3 throughput at 299x299 (random weights: the cost does not
depend on them). Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--inception-images", type=int, default=8)
    ap.add_argument("--skip-sqrtm", action="store_true", help="skip the slow 2048x2048 sqrtm route")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from g3n_eval import metrics as M
    from g3n_eval.frechet import GaussianStats, frechet_distance, frechet_from_features
    from g3n_eval.inception import InceptionV3Features
    from g3n_shards.testing import brain_like

    rng = np.random.default_rng(0)
    x = brain_like(rng, (160, 192, 160))
    y = x + rng.normal(0, 10, x.shape).astype(np.float32) * (x > 0)
    t = time.perf_counter()
    s = M.score_volume(x, y)
    print(json.dumps({"what": "score_volume 160x192x160 (mse/psnr/ssim, whole+mask)", "seconds": round(time.perf_counter() - t, 3),
                      "ssim": round(s.ssim, 4), "ssim_brain": round(s.ssim_brain, 4)}))

    f1, f2 = rng.normal(size=(64, 2048)), rng.normal(0.1, 1.1, size=(64, 2048))
    t = time.perf_counter()
    fd_fast = frechet_from_features(f1, f2)
    t_fast = time.perf_counter() - t
    row = {"what": "FD 64 vs 64 x 2048", "low_rank_seconds": round(t_fast, 4), "fd": round(fd_fast, 4)}
    if not a.skip_sqrtm:
        s1, s2 = GaussianStats.of(f1), GaussianStats.of(f2)
        t = time.perf_counter()
        fd_slow = frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
        row.update(sqrtm_seconds=round(time.perf_counter() - t, 2), fd_sqrtm=round(fd_slow, 4),
                   rel_diff=abs(fd_slow - fd_fast) / fd_fast)
    print(json.dumps(row))

    model = InceptionV3Features("fid", 1008).eval().to(a.device)
    imgs = torch.rand(a.inception_images, 3, 299, 299, device=a.device)
    with torch.no_grad():
        model(imgs[:1])
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(imgs)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(json.dumps({"what": "inception-v3 pool3 at 299", "device": a.device, "threads": a.threads,
                      "images": a.inception_images, "images_per_second": round(a.inception_images / dt, 2)}))


if __name__ == "__main__":
    main()
