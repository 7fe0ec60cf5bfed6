"""cluster.yaml passes Ray's own launcher validation offline and runs the pinned Ray version."""
import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_launcher_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # raises on schema errors
    assert prepared["head_node_type"] == "head"
    gpu = prepared["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] <= prepared["max_workers"]


def test_cluster_runs_the_ray_version_pinned_in_pyproject(cluster):
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    import ray

    assert ray.__version__ == pin
    assert re.search(r":(\d+\.\d+\.\d+)-", cluster["docker"]["image"]).group(1) == pin


def test_cluster_has_no_credentials_and_a_private_dashboard(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|ssh_private_key", text)
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_invalid_cluster_yaml_is_rejected(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_worker"]["min_wrokers"] = 1
    with pytest.raises(Exception):
        validate_config(prepare_config(bad))


def test_cluster_enables_token_auth_with_the_token_kept_outside_the_file(cluster):
    """Issue 15.17: every node (and every command in the container) runs RAY_AUTH_MODE=token; the
    token itself comes from the user's ~/.ray/auth_token at `ray up`, never from this file or the repo."""
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    mounts = cluster["file_mounts"]
    assert mounts["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path on the nodes
    assert not Path(mounts["/home/ray/.ray/auth_token"]).expanduser().resolve().is_relative_to(ROOT)
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN" not in text and not re.search(r"\b[0-9a-f]{32,}\b", text)  # no token value
