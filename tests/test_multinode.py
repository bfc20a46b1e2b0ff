"""Multi-node: a `ray.cluster_utils.Cluster` (head + 1 worker node, both on this machine, bound to
127.0.0.1) runs a sweep whose trials land on both nodes (node id per trial in trials.csv), all
reading the feature cache computed once, in the object store."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

SPACE = """
name: multinode
task: covid_vs_rest
data: {synthetic: {n_patients: 12, size: 96, shortcut: 0.9, seed: 3}}
folds: 2
epochs: 3
num_samples: 2
base_size: 96
input_size: 64
views: 1
asha: {grace_period: 3, reduction_factor: 2}
resources: {cpus_per_trial: 1, gpus_per_trial: 0}
space:
  backbone: efficientnet_lite0
  weights: imagenet
  hidden: {choice: [16, 32]}
  lr: {loguniform: [1.0e-3, 1.0e-2]}
"""
# two nodes of one CPU each: the two trials run at the same time, so on different nodes
CLUSTER = textwrap.dedent("""
    import json, sys
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    print(json.dumps({"address": cluster.address, "head": cluster.head_node.node_id,
                      "worker": worker.node_id}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    cluster.shutdown()
""")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTUNE_EPOCH_DELAY_S": "1",
       "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every node's servers on 127.0.0.1


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.Popen([sys.executable, "-c", CLUSTER], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line, "the local cluster did not start"
        yield json.loads(line)
    finally:
        proc.stdin.close()  # Cluster.shutdown() stops both nodes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow  # a two-node Ray cluster and a sweep across it (~40 s): `python -m pytest -m slow`
def test_trials_land_on_both_nodes_and_share_the_cache(cluster: dict, tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "search.cli", "run", "--space", str(tmp_path / "space.yaml"),
                           "--out", str(tmp_path / "results"), "--name", "mn", "--address", cluster["address"]],
                          cwd=ROOT, env={**ENV, "CXRTUNE_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert "2 node(s)" in log

    trials = pd.read_csv(tmp_path / "results" / "mn" / "trials.csv")
    assert (trials["status"] == "TERMINATED").all() and len(trials) == 2
    assert set(trials["node_id"]) == {cluster["head"], cluster["worker"]}
    # one feature set for the sweep (one feature task), read by the trials of both nodes
    assert len([ln for ln in log.splitlines() if ln.strip().startswith("features efficientnet_lite0|")]) == 1
    assert trials["weights_sha256"].nunique() == 1 and trials["cam_grid"].nunique() == 1
    print(f"\nmulti-node sweep: {time.time() - t0:.0f}s, trials on nodes "
          f"{sorted(n[:8] for n in trials['node_id'])}")
