"""Seconds per head-stage trial-epoch with the Grad-CAM loss off (λ = 0) and on (λ > 0).

A phantom set through the real feature pass (efficientnet_lite0, ImageNet weights offline), then
`HeadStage` epochs (every fold trains, validates and scores Grad-CAM) on one torch thread, as a
1-CPU trial runs them; best of `--repeats` epochs each::

    python benchmarks/cam_loss_epoch.py                       # 60 patients, 224 px (7×7 grid), 3 folds
    python benchmarks/cam_loss_epoch.py --patients 24 --size 96
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainable.data.dataset import load_dataset  # noqa: E402
from trainable.data.phantom import synthesize  # noqa: E402
from trainable.models.featureset import FeatureKey  # noqa: E402
from trainable.prepare import prepare_local  # noqa: E402
from trainable.shared import Settings, with_defaults  # noqa: E402
from trainable.train.head_stage import HeadStage, cached_scoring, new_fold_state  # noqa: E402
from trainable.train.lockstep import lockstep_epoch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        manifest = synthesize(Path(d) / "data", n_patients=args.patients, size=args.size, shortcut=0.9, seed=0)
        ds = load_dataset(manifest.parent, "covid_vs_rest")
        settings = Settings(folds=args.folds, base_size=args.size, input_size=args.size, views=2, cache_dir="off")
        key = FeatureKey("efficientnet_lite0", "imagenet", 0.0, args.size)
        prepared = prepare_local(ds, settings, [key], ["light"], progress=lambda m: None)
    fs = prepared.feature_set(key)
    print(f"{len(prepared.labels)} images, maps {tuple(fs.maps.shape[1:])}, {args.folds} folds, 1 thread")
    for lam in (0.0, args.lam):
        config = with_defaults({"augment": "light", "cam_loss": lam})
        scoring = cached_scoring(config, prepared, fs)   # built once per trial either way
        states = [new_fold_state(config, fs.maps.shape[1], len(prepared.classes), k) for k in range(args.folds)]
        stage = HeadStage(states, config, prepared, fs, scoring=scoring)
        times = []
        for epoch in range(args.repeats):
            t0 = time.perf_counter()
            lockstep_epoch(stage, prepared, epoch)
            times.append(time.perf_counter() - t0)
        print(f"cam_loss {lam:g}: {min(times):.3f} s per trial-epoch (best of {args.repeats}; "
              f"median {sorted(times)[len(times) // 2]:.3f} s)")


if __name__ == "__main__":
    main()
