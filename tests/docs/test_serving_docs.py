"""docs/k8s/triton-cait.yaml is valid YAML with what a Triton Deployment + Service needs."""

from __future__ import annotations

from pathlib import Path

import yaml

DOC = Path(__file__).resolve().parents[2] / "docs" / "k8s" / "triton-cait.yaml"


def test_kubernetes_example_is_a_deployment_and_a_service():
    docs = list(yaml.safe_load_all(DOC.read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    dep, svc = kinds["Deployment"], kinds["Service"]
    assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels and svc["spec"]["selector"] == labels
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert "--model-repository=/models" in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["models"] == "/models"
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
