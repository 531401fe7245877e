"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas (offline:
kubernetes-validate ships them), and the values that matter in step with the code and
the image: probe paths and ports, the stop deadline, the command, the user, settings
and secrets where they belong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes

from config import _SETTINGS, redact
from kafka_processor import _STOP_DEADLINE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes the manifests are for (docs/operations.md), and the newest schemas bundled.
VERSIONS = ("1.29.0", kubernetes.latest_version())


def manifests() -> dict[str, dict]:
    """Every resource, by kind."""
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in found, f"two of {document['kind']}"
            found[document["kind"]] = document
    return found


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    return manifests()


@pytest.fixture(scope="module")
def pod(resources) -> dict:
    return resources["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    [only] = pod["spec"]["containers"]
    return only


def test_the_manifests_are_the_expected_resources(resources):
    assert set(resources) == {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(resources, version):
    for kind, resource in resources.items():
        kubernetes.validate(resource, version, strict=True)  # raises on any unknown or wrong field
        print(f"{kind}: valid for Kubernetes {version}")


def test_the_validation_rejects_a_misspelt_field(resources):
    """strict: a typo is an error, not an ignored field (the check can fail)."""
    import copy

    broken = copy.deepcopy(resources["Deployment"])
    context = broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes.validate(broken, kubernetes.latest_version(), strict=True)


def test_probes_and_scraping_ask_the_port_the_processor_serves(resources, pod, container):
    port = int(resources["ConfigMap"]["data"]["METRICS_PORT"])
    [declared] = container["ports"]
    assert declared["containerPort"] == port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        check = container[probe]["httpGet"]
        assert check["path"] == path
        assert check["port"] in (declared["name"], port)
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port and annotations["prometheus.io/path"] == "/metrics"


def test_the_grace_period_covers_the_stop_deadline(pod, container):
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > _STOP_DEADLINE_SECONDS
    assert "preStop" not in container.get("lifecycle", {})  # nothing else eats into it


def dockerfile_final_stage() -> str:
    text = (ROOT / "Dockerfile").read_text()
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]


def test_image_command_and_user_are_the_dockerfiles(pod, container):
    final = dockerfile_final_stage()
    cmd = re.search(r"^CMD (\[.*\])$", final, flags=re.MULTILINE).group(1)
    assert container["command"] == yaml.safe_load(cmd)
    assert re.fullmatch(r"[\w./-]+/login-analytics:\d+\.\d+\.\d+", container["image"]), container["image"]
    uid = int(re.search(r"useradd .*--uid (\d+)", final).group(1))
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    assert re.search(r"^USER app$", final, flags=re.MULTILINE)  # the image is non-root on its own too


def test_read_only_and_unprivileged(pod, container):
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    assert "PYTHONDONTWRITEBYTECODE=1" in dockerfile_final_stage()  # nothing to write at run time
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_settings_from_the_configmap_secrets_from_the_secret(resources, container):
    settings, secret = resources["ConfigMap"]["data"], resources["Secret"]["stringData"]
    sources = {next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]}
    assert sources == {
        "configMapRef": resources["ConfigMap"]["metadata"]["name"],
        "secretRef": resources["Secret"]["metadata"]["name"],
    }
    for name in {**settings, **secret}:
        assert name in _SETTINGS or name.startswith("KAFKA_"), f"unknown setting {name}"
    for name, value in settings.items():  # nothing the processor would mask in its log
        assert redact(name.lower().replace("_", "."), value) == value, f"{name} belongs in the Secret"
    masked = {name for name, value in secret.items() if redact(name.lower().replace("_", "."), value) == "***"}
    assert masked and set(secret) <= masked | {"KAFKA_SASL_USERNAME"}  # credentials only
    assert "env" not in container  # one place for each


def test_two_or_more_processors_one_disruption_at_a_time(resources, pod):
    deployment, budget = resources["Deployment"], resources["PodDisruptionBudget"]
    assert deployment["spec"]["replicas"] >= 2
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_memory_is_requested_and_limited_above_the_measured_peak(container):
    """The benchmark's peak RSS per process (201 MB for two processors, docs/performance.md)."""
    measured_peak_mib = 201 * 10**6 / 2**20
    resources = container["resources"]

    def mib(quantity: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
        return int(number) * (1024 if unit == "Gi" else 1)

    request, limit = mib(resources["requests"]["memory"]), mib(resources["limits"]["memory"])
    assert measured_peak_mib < request <= limit
    assert limit >= 2 * measured_peak_mib  # room for a window at the distinct-value bound
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"]
