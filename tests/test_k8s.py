"""k8s/rayjob.yaml against KubeRay's own RayJob CRD, offline.

tests/schemas/kuberay-v1.7.0-ray.io_rayjobs.yaml.gz is KubeRay v1.7.0's published CRD
(ray-operator/config/crd/bases/ray.io_rayjobs.yaml of github.com/ray-project/kuberay, tag v1.7.0,
commit 9c13e713, Apache-2.0), unchanged but gzipped. Its openAPIV3Schema is checked as the API
server does with strict field validation (`kubectl apply --validate=strict`): types, enums,
required fields, and no field the schema does not name. The CEL rules (x-kubernetes-validations)
are not evaluated here.
"""
import copy
import gzip
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ctal.config import PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "tests" / "schemas" / "kuberay-v1.7.0-ray.io_rayjobs.yaml.gz"


def strict(schema):
    """The CRD schema with unknown fields refused wherever Kubernetes would refuse them."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    # 1.4 MB of YAML: libyaml's loader where PyYAML has it (seconds, not a minute on a loaded machine)
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft4Validator(strict(v1["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())


def test_rayjob_manifest_is_valid_under_kuberays_rayjob_crd(validator, rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rayjob)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("break_it, message", [
    (lambda j: j["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),  # a typo
    (lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"), "'tokens' is not one of"),
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required"),
])
def test_a_broken_rayjob_manifest_is_refused(validator, rayjob, break_it, message):
    bad = copy.deepcopy(rayjob)
    break_it(bad)
    assert any(message in e.message for e in validator.iter_errors(bad))


def test_rayjob_runs_the_pinned_ray_with_token_auth_and_a_valid_pipeline_command(rayjob):
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pin
    assert f"FROM rayproject/ray:{pin}-" in (ROOT / "k8s" / "Dockerfile").read_text()
    assert cluster["authOptions"]["mode"] == "token"
    python, recipe, *args = shlex.split(rayjob["spec"]["entrypoint"])
    assert recipe.startswith("/home/ray/ctal-ray/") and (ROOT / recipe.removeprefix("/home/ray/ctal-ray/")).is_file()
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    load_config(PretrainConfig, [ROOT / "configs" / "pretrain.yaml"], overrides)  # ConfigError on a bad key
