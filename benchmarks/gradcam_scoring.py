"""Grad-CAM lung/edge scoring speed: the per-epoch grid path vs the full-resolution path.

Every trial scores the Grad-CAM of every validation image in every epoch
(`trainable.cam.explain.explanation_scores`). This times it against building the S×S maps
(`normalise_and_resize` + `region_masses`, what `cxrtune explain` and the montages do) on the
same random feature maps, on one thread (what a 1-CPU trial gets), and checks they agree::

    python benchmarks/gradcam_scoring.py                  # 600 images, 1280 channels, 7×7 → 224 px
    python benchmarks/gradcam_scoring.py --grid 14 --size 448
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainable.cam.explain import edge_band, explanation_scores, gradcam_from_maps, normalise_and_resize, region_masses  # noqa: E402
from trainable.models.head import Head  # noqa: E402


def full_resolution(head, maps, targets, lung, edge, batch_size: int = 256):
    out = []
    for s in range(0, len(maps), batch_size):
        cam = normalise_and_resize(gradcam_from_maps(head, maps[s:s + batch_size], targets[s:s + batch_size]),
                                   lung.shape[-1]).detach()
        out.append(region_masses(cam, lung[s:s + batch_size], edge))
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def best_of(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--channels", type=int, default=1280, help="feature maps (EfficientNet-Lite0: 1280)")
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, s = args.images, args.size
    head = Head(args.channels, 256, 2, 0.2)
    maps = (torch.rand(n, args.channels, args.grid, args.grid) * 2).half().float()  # cached maps are fp16
    targets = torch.as_tensor(rng.integers(0, 2, n))
    yy, xx = np.mgrid[:s, :s]
    cy, cx = rng.uniform(0.35, 0.65, (2, n, 1, 1)) * s
    lung = ((yy - cy) ** 2 + (xx - cx) ** 2) < (0.3 * s) ** 2
    edge = edge_band(s, 0.08)
    t_grid, grid = best_of(lambda: explanation_scores(head, maps, targets, lung, edge), args.repeats)
    t_full, full = best_of(lambda: full_resolution(head, maps, targets, lung, edge), args.repeats)
    diff = max(float(np.abs(grid[0] - full[0]).max()), float(np.abs(grid[1] - full[1]).max()))
    print(f"{n} images, {args.channels}×{args.grid}×{args.grid} maps → {s}px, {args.threads} thread(s), "
          f"best of {args.repeats}")
    print("| path | seconds | images/s |\n|---|---:|---:|")
    print(f"| grid (explanation_scores) | {t_grid:.3f} | {n / t_grid:,.0f} |")
    print(f"| full resolution (normalise_and_resize + region_masses) | {t_full:.3f} | {n / t_full:,.0f} |")
    print(f"speed-up {t_full / t_grid:.1f}×; largest |difference| in lung/edge mass {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
