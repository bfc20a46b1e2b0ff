"""A prepared GPU check: what has to work on one CUDA GPU, in under five minutes, printed as one table.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --cpu-only # the parts that run anywhere (the test suite runs this)

On a GPU it checks, on phantom data:

1. the CUDA feature pass (float16 autocast, batches of 64) against the CPU float32 maps of the same
   images: the largest difference relative to the largest |map| must stay under 2e-2 (float16 keeps
   ~3 significant digits; BatchNorm folding on the CPU adds ~1e-5);
2. a real sweep with `gpus_per_trial: 0.25` (four trials on the GPU at once), ASHA (grace 1,
   factor 2) and a fine-tuning arm (`ft_epochs` 0 or 1), through `search.api.run_sweep`;
3. GPU memory while it runs and after it (Ray issue #23971: memory kept after ASHA stops a trial):
   used memory is sampled every 0.25 s; the table gives the baseline, the peak, the used memory
   after the sweep and the largest number of trials the sweep ran at once.

Without CUDA it says so, runs part 1 on the CPU against itself (the code path, not a GPU result)
and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MAPS_TOLERANCE = 2e-2  # largest |cuda − cpu| / largest |cpu map|


def phantom_images(work: Path, n_patients: int = 12, size: int = 96) -> np.ndarray:
    """Decoded phantom images, uint8 (N, size, size)."""
    from trainable.data.dataset import load_dataset
    from trainable.data.images import decode_images
    from trainable.data.phantom import synthesize

    manifest = synthesize(work / "phantom", n_patients=n_patients, size=size, shortcut=0.9, seed=0)
    return decode_images(load_dataset(manifest.parent, "covid_vs_rest"), size)[0]


def maps_difference(images: np.ndarray, device: str, input_size: int = 96) -> dict[str, float]:
    """The feature pass on `device` (CUDA: float16 autocast) against the CPU float32 pass."""
    from trainable.models.backbones import build_backbone
    from trainable.models.features import feature_maps, inference_model

    backbone = build_backbone("efficientnet_lite0", "imagenet")
    t0 = time.perf_counter()
    cpu = feature_maps(backbone, images, 0.0, input_size, model=inference_model(backbone, input_size,
                                                                                torch.device("cpu")))
    t_cpu = time.perf_counter() - t0
    other = build_backbone("efficientnet_lite0", "imagenet")
    t0 = time.perf_counter()
    dev = feature_maps(other, images, 0.0, input_size, model=inference_model(other, input_size, torch.device(device)))
    t_dev = time.perf_counter() - t0
    rel = float((dev - cpu).abs().max() / cpu.abs().max().clamp_min(1e-12))
    return {"images": len(images), "relative_max_difference": rel, "cpu_s": t_cpu, f"{device}_s": t_dev}


class GpuMemory(threading.Thread):
    """Used GPU memory (all processes, from the driver's view of the device) every `interval` s."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()

    @staticmethod
    def used() -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.time(), self.used()))
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def gpu_sweep(work: Path) -> dict[str, object]:
    """Four trials at 0.25 GPU each, ASHA, one fine-tuning arm; memory sampled throughout."""
    import pandas as pd

    from search.api import load_space, run_sweep

    spec = load_space("default")
    spec = spec.model_validate(spec.model_dump() | {
        "name": "gpu-check", "num_samples": 4, "epochs": 3, "folds": 2, "base_size": 96, "input_size": 96,
        "views": 2, "holdout": 0.0, "asha": {"grace_period": 1, "reduction_factor": 2},
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0.25},
        "data": {"synthetic": {"n_patients": 24, "size": 96, "seed": 0}},
        "space": {**spec.model_dump()["space"], "ft_epochs": {"choice": [0, 1]}, "ft_lr": 1.0e-4}})
    memory = GpuMemory()
    baseline = GpuMemory.used()
    memory.start()
    t0 = time.perf_counter()
    try:
        results = run_sweep(spec, out=work / "results", name="gpu-check", log=lambda m: None)
    finally:
        memory.stop()
    wall = time.perf_counter() - t0
    time.sleep(2.0)  # Ray's workers exit after the fit
    after = GpuMemory.used()
    trials = pd.read_csv(results / "trials.csv", dtype={"trial_id": str})
    history = pd.read_csv(results / "history.csv", dtype={"trial_id": str})
    return {"wall_s": wall, "trials": len(trials), "finished": int((trials["status"] == "TERMINATED").sum()),
            "stopped_by_asha": int(trials["stopped_early"].astype(bool).sum()),
            "ft_trials": int((history.get("stage", pd.Series(dtype=str)) == "ft").groupby(history["trial_id"]).any().sum()),
            "baseline_gib": baseline / 2**30, "peak_gib": max(u for _, u in memory.samples) / 2**30,
            "after_gib": after / 2**30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-only", action="store_true", help="the parts that need no GPU, even where there is one")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_only
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="cxrtune-gpu-check-") as tmp:
        work = Path(tmp)
        images = phantom_images(work)
        if not cuda:
            print("no CUDA device: the GPU check has not run on a GPU (CPU part only: the map comparison "
                  "code path, CPU against CPU)")
        device = "cuda" if cuda else "cpu"
        d = maps_difference(images, device)
        ok = d["relative_max_difference"] <= MAPS_TOLERANCE
        rows.append((f"feature maps {device} vs cpu float32 ({d['images']} images)",
                     f"max |Δ| / max |map| = {d['relative_max_difference']:.2e} (≤ {MAPS_TOLERANCE:g})",
                     "ok" if ok else "FAIL"))
        rows.append(("feature pass time", f"cpu {d['cpu_s']:.2f} s, {device} {d[f'{device}_s']:.2f} s", ""))
        if cuda:
            s = gpu_sweep(work)
            rows.append(("sweep, gpus_per_trial 0.25 (4 trials, ASHA, ft arm)",
                         f"{s['finished']}/{s['trials']} finished, {s['stopped_by_asha']} stopped by ASHA, "
                         f"{s['ft_trials']} fine-tuned, {s['wall_s']:.0f} s", "ok" if s["finished"] == s["trials"] else "FAIL"))
            released = s["after_gib"] <= s["baseline_gib"] + 0.25
            rows.append(("GPU memory used", f"baseline {s['baseline_gib']:.2f} GiB, peak {s['peak_gib']:.2f} GiB, "
                         f"after the sweep {s['after_gib']:.2f} GiB", "ok" if released else "NOT RELEASED"))
    width = max(len(r[0]) for r in rows)
    print(f"| {'check'.ljust(width)} | result | |")
    print(f"|{'-' * (width + 2)}|---|---|")
    for name, value, verdict in rows:
        print(f"| {name.ljust(width)} | {value} | {verdict} |")
    return 0 if all(r[2] in ("ok", "") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
