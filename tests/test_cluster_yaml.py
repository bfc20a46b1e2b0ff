"""cluster.yaml is a valid Ray cluster-launcher config (the schema shipped with the installed Ray),
installs this project with pinned dependencies, and keeps every Ray endpoint private."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_installed_ray_schema(config: dict) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(config, schema)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):  # the check is live: unknown keys are refused
        jsonschema.validate(broken, schema)


def test_passes_the_launchers_own_checks(config: dict) -> None:
    # what `ray up` runs before it talks to the cloud: fill defaults, then validate
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cpu_head_and_autoscaling_gpu_workers(config: dict) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(w["resources"].get("GPU", 0) >= 1 and w.get("min_workers", 0) == 0 for w in workers)
    assert config["max_workers"] >= max(w["max_workers"] for w in workers) >= 1


def test_installs_the_project_with_pinned_dependencies(config: dict) -> None:
    setup = " ".join(config["setup_commands"])
    assert f'"ray[default,tune]=={ray.__version__}"' in setup, "the cluster's Ray must equal the client's"
    for pkg in ("torch", "torchvision", "timm", "optuna"):
        assert re.search(rf'"{pkg}==[0-9][^"]*"', setup), pkg
    assert "-e ~/cxrtune" in setup
    assert config["file_mounts"]["~/cxrtune"] == "."
    assert ".venv" in config["rsync_exclude"] and "results" in config["rsync_exclude"]


def test_private_by_default(config: dict) -> None:
    text = (ROOT / "cluster.yaml").read_text()
    commands = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]]
    head_start = next(c for c in config["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in json.dumps(config)  # nothing listens on, or opens to, every address
    assert all("RAY_AUTH_MODE=token" in c for c in commands if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # no inbound rules of our own: the launcher's group allows SSH and intra-cluster traffic only
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    assert "ray-security" in text  # Ray's security guidance is cited next to the settings
