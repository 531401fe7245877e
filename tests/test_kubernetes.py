"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas (offline:
kubernetes-validate ships them), and the values that matter in step with the code and
the image: the image and its tag, probe paths and ports, the stop deadline, the
command, the user, the memory limit from the merge bound, settings and secrets where
they belong, and Jobs that run the recovery tools with a read-only root filesystem.

What `kubectl apply -k` applies is rendered here from the kustomizations (resources,
components, images: the subset used); `test_the_rendering_is_what_kustomize_makes`
holds that rendering to kubectl's own."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from kubernetes_validate import utils as kubernetes

import kafka_processor
from config import _SETTINGS, Settings, build_settings, redact
from kafka_processor import _STOP_DEADLINE_SECONDS
from ops import dlq_replay, recompute, recompute_cleanup
from testkit.processes import require_tool

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
JOBS = MANIFESTS / "jobs"
# The oldest Kubernetes the manifests are for (docs/operations.md), and the newest schemas bundled.
VERSIONS = ("1.29.0", kubernetes.latest_version())
CA_SECRET = "login-processor-kafka-ca"


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def image_rules(directory: Path) -> list[dict]:
    """The `images:` entries that apply to a kustomization: its own and its components'."""
    own = kustomization(directory)
    rules = list(own.get("images", []))
    for component in own.get("components", []):
        rules += kustomization((directory / component).resolve()).get("images", [])
    return rules


def containers_of(resource: dict) -> list[dict]:
    spec = resource.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    return pod.get("containers", []) + pod.get("initContainers", [])


def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize directory` makes of it (resources, components' images)."""
    resources = [
        document
        for name in kustomization(directory)["resources"]
        for document in yaml.safe_load_all((directory / name).read_text())
    ]
    for rule in image_rules(directory):
        for resource in resources:
            for container in containers_of(resource):
                if container["image"] == rule["name"]:
                    container["image"] = f"{rule.get('newName', rule['name'])}:{rule['newTag']}"
    return resources


def by_kind(resources: list[dict]) -> dict[str, dict]:
    found = {}
    for resource in resources:
        assert resource["kind"] not in found, f"two of {resource['kind']}"
        found[resource["kind"]] = resource
    return found


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    """What `kubectl apply -k deploy/kubernetes/` applies, by kind."""
    return by_kind(render(MANIFESTS))


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    """The Jobs of deploy/kubernetes/jobs/, by their component label."""
    rendered = render(JOBS)
    assert {resource["kind"] for resource in rendered} == {"Job"}
    return {job["metadata"]["labels"]["app.kubernetes.io/component"]: job for job in rendered}


@pytest.fixture(scope="module")
def example_secret() -> dict:
    [secret] = yaml.safe_load_all((MANIFESTS / "examples" / "secret.yaml").read_text())
    return secret


@pytest.fixture(scope="module")
def pod(resources) -> dict:
    return resources["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    [only] = pod["spec"]["containers"]
    return only


def only_container(job: dict) -> dict:
    [only] = job["spec"]["template"]["spec"]["containers"]
    return only


def test_the_default_apply_is_the_processors_and_never_a_secret(resources):
    """`kubectl apply -k deploy/kubernetes/` applies every manifest of the directory (none
    left out by mistake) and no Secret: a real one is never overwritten with placeholders.
    The Jobs and the example Secret sit in subdirectories, which neither -k nor -f reads."""
    assert set(resources) == {"ConfigMap", "Deployment", "PodDisruptionBudget"}
    top_level = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization(MANIFESTS)["resources"]) == top_level
    assert not (MANIFESTS / "secret.yaml").exists()


def every_manifest(resources, jobs, example_secret) -> list[dict]:
    return [*resources.values(), *jobs.values(), example_secret]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(resources, jobs, example_secret, version):
    for resource in every_manifest(resources, jobs, example_secret):
        kubernetes.validate(resource, version, strict=True)  # raises on any unknown or wrong field
        print(f"{resource['kind']} {resource['metadata']['name']}: valid for Kubernetes {version}")


def test_the_validation_rejects_a_misspelt_field(resources):
    """strict: a typo is an error, not an ignored field (the check can fail)."""
    broken = copy.deepcopy(resources["Deployment"])
    context = broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes.validate(broken, kubernetes.latest_version(), strict=True)


def kustomize_command() -> list[str]:
    """`kubectl kustomize`, or the standalone `kustomize build` (.ci/run installs it with Go
    where kubectl is missing: Debian's kubectl is too old for kustomize components)."""
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    return [require_tool("kustomize", "kustomize (go install sigs.k8s.io/kustomize/kustomize/v5@v5.5.0)"), "build"]


def test_the_rendering_is_what_kustomize_makes():
    command = kustomize_command()
    for directory in (MANIFESTS, JOBS):
        made = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=60, check=True).stdout
        ours = sorted(render(directory), key=lambda r: (r["kind"], r["metadata"]["name"]))
        theirs = sorted(yaml.safe_load_all(made), key=lambda r: (r["kind"], r["metadata"]["name"]))
        assert theirs == ours, directory


def test_one_image_set_in_one_place_tagged_with_the_release(resources, jobs):
    """Every container runs the image of image/kustomization.yaml, whose tag is the
    project's version: the manifests name it `login-analytics`, and nothing else."""
    [rule] = image_rules(MANIFESTS)
    assert image_rules(JOBS) == [rule]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert rule["newTag"] == version
    assert re.fullmatch(r"[\w.-]+(:\d+)?(/[\w.-]+)+", rule["newName"]), rule["newName"]
    for path in [*MANIFESTS.glob("*.yaml"), *JOBS.glob("*.yaml")]:
        for resource in yaml.safe_load_all(path.read_text()):
            for each in containers_of(resource or {}):
                assert each["image"] == rule["name"], f"{path.name}: {each['image']}"
    for resource in [*resources.values(), *jobs.values()]:
        for each in containers_of(resource):
            assert each["image"] == f"{rule['newName']}:{version}"


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


def test_the_grace_period_covers_the_stop_deadline(pod, container, jobs):
    for spec in (pod["spec"], jobs["recompute"]["spec"]["template"]["spec"]):  # the processors
        assert spec["terminationGracePeriodSeconds"] > _STOP_DEADLINE_SECONDS
    assert "preStop" not in container.get("lifecycle", {})  # nothing else eats into it


def dockerfile_final_stage() -> str:
    text = (ROOT / "Dockerfile").read_text()
    return re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]


def test_command_and_user_are_the_dockerfiles(pod, container, jobs):
    final = dockerfile_final_stage()
    cmd = re.search(r"^CMD (\[.*\])$", final, flags=re.MULTILINE).group(1)
    assert container["command"] == yaml.safe_load(cmd)
    assert only_container(jobs["recompute"])["command"] == yaml.safe_load(cmd)
    uid = int(re.search(r"useradd .*--uid (\d+)", final).group(1))
    for spec in [pod["spec"], *(job["spec"]["template"]["spec"] for job in jobs.values())]:
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
    assert re.search(r"^USER app$", final, flags=re.MULTILINE)  # the image is non-root on its own too


def test_read_only_and_unprivileged_everywhere(container, jobs):
    assert "PYTHONDONTWRITEBYTECODE=1" in dockerfile_final_stage()  # nothing to write at run time
    for each in [container, *(only_container(job) for job in jobs.values())]:
        context = each["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]


def test_each_pod_logs_under_its_own_name(container, jobs):
    for each in [container, *(only_container(job) for job in jobs.values())]:
        [name] = [variable for variable in each["env"] if variable["name"] == "PROCESSOR_NAME"]
        assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_ca_file_the_settings_name_is_mounted_from_its_secret(resources, pod, container, jobs):
    location = Path(resources["ConfigMap"]["data"]["KAFKA_SSL_CA_LOCATION"])
    specs = [
        (pod["spec"], container),
        *((job["spec"]["template"]["spec"], only_container(job)) for job in jobs.values()),
    ]
    for spec, each in specs:
        [mount] = [m for m in each["volumeMounts"] if location.is_relative_to(m["mountPath"])]
        assert mount.get("readOnly") is True
        [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == CA_SECRET
        # optional: without TLS nothing is mounted; with it and no Secret, one line naming the setting
        assert volume["secret"]["optional"] is True
        assert {"key": "ca.crt", "path": str(location.relative_to(mount["mountPath"]))} in volume["secret"]["items"]


def test_settings_from_the_configmap_secrets_from_the_secret(resources, container, jobs, example_secret):
    settings, secret = resources["ConfigMap"]["data"], example_secret["stringData"]
    for each in [container, *(only_container(job) for job in jobs.values())]:
        sources = {next(iter(source)): next(iter(source.values()))["name"] for source in each["envFrom"]}
        assert sources == {
            "configMapRef": resources["ConfigMap"]["metadata"]["name"],
            "secretRef": example_secret["metadata"]["name"],
        }
        assert [variable["name"] for variable in each["env"]] == ["PROCESSOR_NAME"]  # the rest in one place
    for name in {**settings, **secret}:
        assert name in _SETTINGS or name.startswith("KAFKA_"), f"unknown setting {name}"
    for name, value in settings.items():  # nothing the processor would mask in its log
        assert redact(name.lower().replace("_", "."), value) == value, f"{name} belongs in the Secret"
    masked = {name for name, value in secret.items() if redact(name.lower().replace("_", "."), value) == "***"}
    assert masked and set(secret) <= masked | {"KAFKA_SASL_USERNAME"}  # credentials only


def test_two_or_more_processors_one_disruption_at_a_time(resources, pod, jobs):
    deployment, budget = resources["Deployment"], resources["PodDisruptionBudget"]
    assert deployment["spec"]["replicas"] >= 2
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for job in jobs.values():  # a Job's pod is neither a processor nor counted by the budget
        job_labels = job["spec"]["template"]["metadata"]["labels"].items()
        assert not deployment["spec"]["selector"]["matchLabels"].items() <= job_labels
        assert not budget["spec"]["selector"]["matchLabels"].items() <= job_labels


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


# docs/performance.md: peak RSS per process of two processors on the benchmark's backlog,
# and one window at the default distinct-value bound; the merge's memory per byte counted
# against MERGE_MAX_PENDING_MB (deployment.yaml's comment says how it was measured).
MEASURED_PEAK_MB = 201
WINDOW_AT_BOUND_MB = 200
MERGE_MEMORY_PER_COUNTED_BYTE = 1.03


def memory_needed_mib(configmap: dict[str, str]) -> float:
    settings = build_settings(configmap)
    window = WINDOW_AT_BOUND_MB * settings.max_distinct_per_window / Settings().max_distinct_per_window
    return (MEASURED_PEAK_MB + window) * 10**6 / 2**20 + settings.merge_max_pending_mb * MERGE_MEMORY_PER_COUNTED_BYTE


def test_the_memory_limit_is_derived_from_the_merge_bound(resources, container, jobs):
    """A merge stall meets the merger's own bound (MERGE_MAX_PENDING_MB) before the
    container's limit, with room for the measured peak and one window at its bound."""
    configmap = resources["ConfigMap"]["data"]
    assert "MERGE_MAX_PENDING_MB" in configmap  # the bound the limit is derived from, stated
    for each in (container, only_container(jobs["recompute"])):
        request, limit = mib(each["resources"]["requests"]["memory"]), mib(each["resources"]["limits"]["memory"])
        assert MEASURED_PEAK_MB * 10**6 / 2**20 < request <= limit
        assert limit >= memory_needed_mib(configmap) * 1.05, (limit, memory_needed_mib(configmap))
        assert each["resources"]["requests"]["cpu"] and each["resources"]["limits"]["cpu"]
    # The check can fail: the previous limit, 512Mi, with the default bound.
    assert memory_needed_mib({"MERGE_MAX_PENDING_MB": "512"}) > 512


def job_settings(parser, args: list[str], configmap: dict[str, str]) -> tuple[Settings, object]:
    """The settings a Job's command line and the ConfigMap give a tool (as it parses them)."""
    namespace = parser.parse_args([*args, "--env-file", ""])
    registered = [name for name in _SETTINGS if hasattr(namespace, name)]
    flags = {name: getattr(namespace, name) for name in registered}
    return build_settings(configmap, flags, only=registered), namespace


def test_the_recompute_jobs_are_one_recomputation_never_the_live_pipeline(resources, jobs):
    configmap = resources["ConfigMap"]["data"]
    live = build_settings(configmap)
    run = only_container(jobs["recompute"])
    recomputation, _ = job_settings(kafka_processor.build_parser(), run["args"], configmap)
    assert recomputation.recompute_from and recomputation.metrics_port == 0
    assert recomputation.consumer_group_id != live.consumer_group_id
    ours = {recomputation.output_topic, recomputation.partials_topic, recomputation.dlq_topic}
    assert not ours & {live.input_topic, live.output_topic, live.partials_topic, live.dlq_topic}
    assert recomputation.input_topic == live.input_topic

    copy_job = only_container(jobs["recompute-copy"])
    assert copy_job["command"] == ["python", "-m", "ops.recompute"]
    _, copying = job_settings(recompute.build_parser(), copy_job["args"], configmap)
    assert copying.source == recomputation.output_topic and copying.dry_run

    cleanup_job = only_container(jobs["recompute-cleanup"])
    assert cleanup_job["command"] == ["python", "-m", "ops.recompute_cleanup"]
    cleaning_settings, cleaning = job_settings(recompute_cleanup.build_parser(), cleanup_job["args"], configmap)
    assert cleaning.group == recomputation.consumer_group_id and cleaning.dry_run
    assert set(cleaning.topic) == ours
    assert recompute_cleanup.refusal(cleaning_settings, cleaning.group, cleaning.topic) is None


def test_the_dlq_job_has_the_tools_and_a_writable_place_for_files(jobs):
    job = jobs["dlq-replay"]
    each, spec = only_container(job), job["spec"]["template"]["spec"]
    [work] = [m for m in each["volumeMounts"] if m["mountPath"] == "/work"]
    [volume] = [v for v in spec["volumes"] if v["name"] == work["name"]]
    assert "emptyDir" in volume and not work.get("readOnly")
    # A file export goes there (the root filesystem is read-only); the tool takes the path.
    namespace = dlq_replay.build_parser().parse_args(["export", "/work/dlq.jsonl", "--env-file", ""])
    assert Path(namespace.file).is_relative_to(work["mountPath"])
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and each["command"][0] == "sleep"
