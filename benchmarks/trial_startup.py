"""What a trial actor pays before its first epoch, item by item, in fresh processes.

    python benchmarks/trial_startup.py            # 3 fresh processes, the median of each item

Each item is timed after the ones above it (imports are cumulative: `import torch` after Ray is
what torch adds), in a new interpreter, as a new Ray worker process would pay them. With
`reuse_actors` a sweep pays these once per trial actor (two on two cores), not once per trial.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# one fresh interpreter: the items in the order a trial actor meets them
_CHILD = r"""
import json, time
t = {}
s = time.perf_counter(); import ray; t["import ray"] = time.perf_counter() - s
s = time.perf_counter(); from ray import tune; t["import ray.tune"] = time.perf_counter() - s
s = time.perf_counter(); import torch; t["import torch"] = time.perf_counter() - s
s = time.perf_counter(); import trainable.trial; t["import trainable.trial (head stage)"] = time.perf_counter() - s
s = time.perf_counter()
from trainable.shared import with_defaults
from trainable.train.head_stage import new_fold_state
state = new_fold_state(with_defaults({"hidden": 32}), 1280, 2, 0)
t["first head + HeadAdam (fused Adam without torch.optim)"] = time.perf_counter() - s
s = time.perf_counter()
torch.optim.Adam(state.head.parameters(), lr=1e-3, fused=True)
t["not paid: torch.optim.Adam, which imports torch._dynamo"] = time.perf_counter() - s
s = time.perf_counter()
import timm, torchvision  # noqa: F401
t["not imported by a head-stage trial: timm + torchvision"] = time.perf_counter() - s
print(json.dumps(t))
"""


def measure(repeats: int) -> dict[str, float]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    items = measure(args.repeats)
    print(f"$ python benchmarks/trial_startup.py --repeats {args.repeats}   (median of fresh processes)\n")
    print("| item | s |\n|---|---:|")
    paid = 0.0
    for name, s in items.items():
        print(f"| {name} | {s:.2f} |")
        if not name.startswith("not "):
            paid += s
    print(f"| **paid once per trial actor** | **{paid:.2f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
