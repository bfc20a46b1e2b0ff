"""How the frozen-backbone feature pass scales with this machine's cores, without Ray or Tune.

    python benchmarks/feature_scaling.py                    # the full benchmark's keys: 600 cxr-real images, 224 px
    python benchmarks/feature_scaling.py --quick            # 80 images at 96 px
    python benchmarks/feature_scaling.py --data synthetic --quick

The same keys as `sweep_throughput.py` (the default space's backbones × crops; 2 augmentation
policies, 3 views), computed three ways in this fresh process, no disk cache:

* one key after another on 1 thread — the single-thread work that `sweep_throughput.py`'s lower
  bound counts and then divides by the cores, as if they scaled perfectly;
* N keys at once, one thread each — what `trainable.prepare` does on a one-node cluster (one thread
  per CPU, each taking the next key when done);
* one key after another with N intra-op threads (torch's parallelism inside each layer).

Speed-up = the single-thread time / the mode's time; N cores scaling perfectly would give N.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights in a benchmark

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.sweep_throughput import DEFAULT_DATA, load_data  # noqa: E402
from search.space import load_space  # noqa: E402
from trainable.cache import cached_features  # noqa: E402
from trainable.data.images import decode_images  # noqa: E402
from trainable.models.featureset import FeatureKey  # noqa: E402

VIEWS = {"light": 3, "none": 3}  # sweep_throughput's sweeps: the default space's two policies


def _compute(images: np.ndarray, key: FeatureKey) -> None:
    cached_features(images, key, VIEWS, 0, None, log=lambda m: None)


def _one_thread(images: np.ndarray, keys: list[FeatureKey], intra_op: int) -> float:
    torch.set_num_threads(intra_op)
    t = time.perf_counter()
    for k in keys:
        _compute(images, k)
    return time.perf_counter() - t


def _keys_at_once(images: np.ndarray, keys: list[FeatureKey], n_threads: int) -> float:
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for k in keys:
        todo.put(k)

    def run() -> None:
        torch.set_num_threads(1)
        while True:
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            _compute(images, k)

    t = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(min(n_threads, len(keys)))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="data directory, or 'synthetic' (phantom data)")
    ap.add_argument("--quick", action="store_true", help="80 images at 96 px (base 112 px)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    n_images, size, base = (80, 96, 112) if args.quick else (600, 224, 256)
    n_images = args.images or n_images
    if args.data != "synthetic" and not Path(args.data).is_dir():
        print(f"skipped: {args.data} is not on this machine; run with --data synthetic")
        return 0
    spec = load_space("default")
    keys = [FeatureKey(b, "imagenet", float(c), size) for b in spec.choices("backbone")
            for c in spec.choices("crop_margin")]
    with tempfile.TemporaryDirectory() as work:
        ds = load_data(args.data, n_images, spec.task, base, 0, Path(work))
        images = decode_images(ds, base)[0]
    n = args.cpus
    print("$ python benchmarks/feature_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print(f"data: {len(images)} images at {size} px (base {base}); {len(keys)} keys: "
          + ", ".join(map(str, keys)) + f"; views {VIEWS}\n")
    for b in sorted({k.backbone for k in keys}):  # each backbone built once first, as a sweep builds it once
        _one_thread(images[:4], [next(k for k in keys if k.backbone == b)], 1)
    total = len(images) * VIEWS["light"] * len(keys)  # view 0 serves both policies: 3 passes a key
    rows = [("one key after another, 1 thread", _one_thread(images, keys, 1)),
            (f"{n} keys at once, 1 thread each (prepare_sweep on one node)", _keys_at_once(images, keys, n)),
            (f"one key after another, {n} intra-op threads", _one_thread(images, keys, n))]
    single = rows[0][1]
    print("| mode | wall s | backbone img/s | speed-up over 1 thread |\n|---|---:|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.1f} | {total / s:.0f} | {single / s:.2f}× |")
    print(f"\nperfect scaling over {n} cores: {n:.2f}× ({single:.1f} s / {n} = {single / n:.1f} s, what the lower "
          f"bound of sweep_throughput.py assumes of its own single-thread pass)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
