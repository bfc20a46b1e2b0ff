"""Seconds per fine-tuning trial-epoch with the Grad-CAM loss off (λ = 0) and on (λ > 0).

A phantom set through the real feature pass and one head epoch (efficientnet_lite0, ImageNet
weights offline), then `FtStage` epochs (every fold trains backbone + head on augmented images,
early-stops on its inner split, validates and scores Grad-CAM) on one torch thread, as a 1-CPU
trial runs them; best of `--repeats` epochs each, the two interleaved::

    python benchmarks/ft_cam_loss_epoch.py                       # 24 patients, 128 px, 2 folds
    python benchmarks/ft_cam_loss_epoch.py --patients 60 --size 224 --folds 3
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainable.data.dataset import load_dataset  # noqa: E402
from trainable.data.phantom import synthesize  # noqa: E402
from trainable.models.featureset import FeatureKey  # noqa: E402
from trainable.prepare import prepare_local  # noqa: E402
from trainable.shared import Settings, with_defaults  # noqa: E402
from trainable.train.finetune import FtStage, epoch_params, model_input, train_mode  # noqa: E402
from trainable.train.ft_levers import ft_batch_loss  # noqa: E402
from trainable.train.head_stage import new_fold_state, run_epoch  # noqa: E402
from trainable.train.lockstep import lockstep_epoch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        manifest = synthesize(Path(d) / "data", n_patients=args.patients, size=args.size, shortcut=0.9, seed=0)
        ds = load_dataset(manifest.parent, "covid_vs_rest")
        settings = Settings(folds=args.folds, base_size=args.size, input_size=args.size, views=2, cache_dir="off")
        key = FeatureKey("efficientnet_lite0", "imagenet", 0.0, args.size)
        prepared = prepare_local(ds, settings, [key], ["light"], progress=lambda m: None)
    fs = prepared.feature_set(key)
    base = with_defaults({"augment": "light", "batch_size": 16, "ft_epochs": args.repeats, "patience": 0})
    states = [new_fold_state(base, fs.maps.shape[1], len(prepared.classes), k) for k in range(args.folds)]
    run_epoch(states, base, prepared, fs, 0)
    n_train = int(np.mean([len(tr) for tr, _ in prepared.folds]))
    print(f"{len(prepared.labels)} images ({n_train} training per fold), {args.size} px, maps {tuple(fs.maps.shape[1:])}, "
          f"{args.folds} folds, 1 thread")
    lams = (0.0, args.lam)
    stages = {lam: FtStage(copy.deepcopy(states), {**base, "cam_loss": lam}, prepared, fs) for lam in lams}
    times: dict[float, list[float]] = {lam: [] for lam in lams}
    for epoch in range(args.repeats):   # interleaved: load from other processes hits both alike
        for lam in lams:
            t0 = time.perf_counter()
            lockstep_epoch(stages[lam], prepared, epoch)
            times[lam].append(time.perf_counter() - t0)
    for lam in lams:
        t = sorted(times[lam])
        print(f"cam_loss {lam:g}: {t[0]:.2f} s per ft trial-epoch (best of {args.repeats}; median {t[len(t) // 2]:.2f} s)")
    step_overhead(stages[args.lam], prepared, fs, base, args.steps)


def step_overhead(stage: FtStage, prepared, fs, config: dict, steps: int) -> None:
    """One training step (forward, loss, backward; the batch's mask warp included for λ > 0) with and
    without the Grad-CAM term, interleaved `steps` times on the same batch: the per-step cost of the
    term, less exposed to other processes' load than whole epochs."""
    model, cam = stage.folds[0].model, stage.cam
    rows = np.arange(int(config["batch_size"]))
    params = epoch_params(config["augment"], len(rows), prepared.settings.seed, 0, 0)
    x = model_input(prepared.image_array()[rows], fs.preprocessing, 0.0, prepared.settings.input_size, params)
    target = torch.as_tensor(np.asarray(prepared.labels)[rows])
    train_mode(model, config["ft_bn"])
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(steps):
        for on in (False, True):
            t0 = time.perf_counter()
            term = (cam.lam, cam.outside(rows, params)) if on else None
            model.zero_grad(set_to_none=True)
            ft_batch_loss(model, x, target, None, None, term)[0].backward()
            times[on].append(time.perf_counter() - t0)
    off, on = (float(np.median(times[k])) for k in (False, True))
    print(f"one step of {len(rows)} images: {off:.3f} s without, {on:.3f} s with the Grad-CAM term "
          f"(median of {steps}, interleaved): +{100 * (on / off - 1):.0f}%")

if __name__ == "__main__":
    main()
