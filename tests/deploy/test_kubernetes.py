"""deploy/kubernetes: schema validation and cross-references between the manifests.

Built-in kinds are validated (strict: unknown fields fail) by `kubernetes-validate`
from PyPI, which bundles the Kubernetes OpenAPI schemas, so it works offline. It has no
schemas for custom resources: ServiceMonitor, InferencePool and HTTPRoute are validated
against crd_schemas.json beside this file (hand-written, covering the fields we use).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.deploy_files import KUBERNETES, manifests
from unlearnd.serve.config import EngineConfig, TenantConfig

K8S_VERSION = "1.30.0"  # oldest of the versions still commonly run with GPU operators
CRD_SCHEMAS = json.loads((Path(__file__).parent / "crd_schemas.json").read_text())
CUSTOM = {"monitoring.coreos.com/v1/ServiceMonitor", "inference.networking.k8s.io/v1/InferencePool",
          "gateway.networking.k8s.io/v1/HTTPRoute"}


def key(obj: dict) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}"


def objects(kind: str) -> list[dict]:
    return [o for _, o in manifests() if o["kind"] == kind]


def only(kind: str) -> dict:
    found = objects(kind)
    assert len(found) == 1, kind
    return found[0]


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate",
                               reason="pip install kubernetes-validate (bundles k8s schemas)")


def validate_builtin(kv, obj: dict) -> None:
    kv.validate(obj, K8S_VERSION, strict=True)


def validate_custom(obj: dict) -> None:
    schema = dict(CRD_SCHEMAS[key(obj)], **{"$defs": CRD_SCHEMAS["$defs"]})
    jsonschema.validate(obj, schema)


@pytest.mark.parametrize("name_and_obj", manifests(),
                         ids=lambda p: f"{p[0]}:{p[1]['kind']}/{p[1]['metadata']['name']}")
def test_manifest_matches_its_schema(kv, name_and_obj: tuple[str, dict]) -> None:
    _, obj = name_and_obj
    if key(obj) in CUSTOM:
        validate_custom(obj)
    else:
        validate_builtin(kv, obj)


def test_validators_reject_broken_objects(kv) -> None:
    deployment = copy.deepcopy(only("Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        validate_builtin(kv, deployment)
    deployment = copy.deepcopy(only("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # unknown field
    with pytest.raises(kv.ValidationError):
        validate_builtin(kv, deployment)
    pool = copy.deepcopy(only("InferencePool"))
    pool["spec"]["targetPort"] = pool["spec"].pop("targetPorts")
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(pool)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}  # real secrets are created by hand


def test_manifests_agree_with_each_other() -> None:
    deployment, service = only("Deployment"), only("Service")
    config = yaml.safe_load(only("ConfigMap")["data"]["config.yaml"])
    engine = EngineConfig.model_validate(config["engine"])
    tenants = [TenantConfig.model_validate(t) for t in config["tenants"]]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == engine.tensor_parallel_size * engine.pipeline_parallel_size
    # Selectors pick the pods; ports line up.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    pool = only("InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["containerPort"] for p in container["ports"]}
    assert config["port"] in container_ports
    assert {p["number"] for p in pool["spec"]["targetPorts"]} <= container_ports
    monitor = only("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}
    route = only("HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    # Every key the server reads from the environment comes from a Secret that the
    # example creates, under a key it has.
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
           if "secretKeyRef" in e.get("valueFrom", {})}
    needed = {config["admin_key_env"], "UNLEARND_DATABASE_URL"} | {
        t.api_key_env for t in tenants if t.api_key_env}
    assert needed <= set(env)
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects("Secret")}
    for ref in env.values():
        assert ref["key"] in secrets[ref["name"]], ref
    # Probes hit the health endpoint the image's HEALTHCHECK uses.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
