"""Least privilege on Apache Kafka: every program with exactly the ACLs broker/authorization.py
names for it, and each of those missing in turn.

One Kafka node with the StandardAuthorizer (`allow.everyone.if.no.acl.found=false`), SCRAM
users `processor`, `monitor`, `generator` and `ops` on its SASL_SSL listener, and the test's
admin (a super user) on PLAINTEXT. The admin creates the pipeline's topics, as on a cluster
where programs get no Create: the pipeline then runs exact with exactly the listed ACLs,
the broker denying it nothing (its authorizer log says every denial); the monitor's user
cannot write anywhere; and a program missing any one ACL stops at start with one line
naming that operation and resource, exit 2, where it used to retry for ever, wait for
ever, or act on a topic it took for empty. docs/operations.md ("Least privilege on Kafka")
is the table of these ACLs, checked here against the code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from broker import authorization
from broker.apache_kafka import BrokerTls, KafkaCluster
from broker.authorization import GROUP, TOPIC, NotAuthorized, Permission
from config import Settings, build_settings
from testkit.oracle import expected_windows
from testkit.processes import (
    ROOT,
    ProcessorProcess,
    Topics,
    new_topics,
    read_topic,
    require_kafka,
    run_script,
    wait_until,
)
from tests.tls_support import make_pki

pytestmark = [pytest.mark.broker, pytest.mark.kafka, pytest.mark.slow]

USERS = ("processor", "monitor", "generator", "ops")
_RESOURCE_TYPES = {
    TOPIC: ResourceType.TOPIC,
    GROUP: ResourceType.GROUP,
    authorization.TRANSACTIONAL_ID: ResourceType.TRANSACTIONAL_ID,
}


def password(user: str) -> str:
    return f"{user}-secret"


def binding(permission: Permission, user: str) -> AclBinding:
    """The ACL that grants `permission` to `user`."""
    return AclBinding(
        _RESOURCE_TYPES[permission.resource],
        permission.name,
        ResourcePatternType.PREFIXED if permission.prefixed else ResourcePatternType.LITERAL,
        f"User:{user}",
        "*",
        permission.acl_operation,
        AclPermissionType.ALLOW,
    )


@dataclass
class Secured:
    """The secured node, and the test's hands on its ACLs."""

    cluster: KafkaCluster
    ca: Path

    @property
    def admin_bootstrap(self) -> str:
        return self.cluster.bootstrap_servers

    def client(self, user: str) -> dict[str, str]:
        """librdkafka settings of `user` on the SASL_SSL listener."""
        return {
            "bootstrap.servers": self.cluster.sasl_ssl_bootstrap_servers,
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": str(self.ca),
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": user,
            "sasl.password": password(user),
        }

    def env(self, user: str, topics: Topics, **more: str) -> dict[str, str]:
        """What a program run as `user` is given: the pipeline's names, SASL_SSL."""
        return topics.env(
            KAFKA_BOOTSTRAP_SERVERS=self.cluster.sasl_ssl_bootstrap_servers,
            KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_SSL_CA_LOCATION=str(self.ca),
            KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
            KAFKA_SASL_USERNAME=user,
            KAFKA_SASL_PASSWORD=password(user),
            **more,
        )

    def grant(self, user: str, permissions: list[Permission]) -> None:
        for future in self.cluster.admin().create_acls([binding(p, user) for p in permissions]).values():
            future.result(10)

    def revoke(self, user: str, permissions: list[Permission]) -> None:
        filters = [
            AclBindingFilter(
                b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation, b.permission_type
            )
            for b in (binding(p, user) for p in permissions)
        ]
        for future in self.cluster.admin().delete_acls(filters).values():
            future.result(10)

    def revoke_everything(self) -> None:
        filters = [
            AclBindingFilter(
                ResourceType.ANY,
                None,
                ResourcePatternType.ANY,
                f"User:{user}",
                None,
                AclOperation.ANY,
                AclPermissionType.ANY,
            )
            for user in USERS
        ]
        for future in self.cluster.admin().delete_acls(filters).values():
            future.result(10)

    def log_mark(self) -> int:
        """Where the node's log ends now (for `denials`)."""
        return self.cluster.nodes[0].log_path.stat().st_size

    def denials(self, user: str, since: int) -> list[str]:
        """The authorizer's log lines, after `since`, of requests it refused `user`
        (kafka/log4j2.properties)."""
        with open(self.cluster.nodes[0].log_path, "rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if f"Principal = User:{user} is Denied" in line]


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    require_kafka()
    directory = tmp_path_factory.mktemp("least-privilege")
    pki = make_pki(directory / "pki")
    cluster = KafkaCluster(
        directory / "kafka",
        tls=BrokerTls(ca=pki.ca, certificate=pki.server_cert, key=pki.server_key),
        scram_users={user: password(user) for user in USERS},
        authorizer=True,
        # As where programs may not create topics: a missing one is not made behind our back.
        server_properties={"auto.create.topics.enable": "false"},
    )
    with cluster:
        print(f"secured node ready in {cluster.start_seconds:.1f}s")
        yield Secured(cluster, pki.ca)


@pytest.fixture
def acls(secured):
    """Every test starts and ends with no ACL for the four users."""
    secured.revoke_everything()
    yield secured
    secured.revoke_everything()


def settings_of(topics: Topics) -> Settings:
    """The settings the programs build from `topics.env()` (for the names in the ACLs)."""
    return build_settings(topics.env())


def created_topics(secured: Secured) -> Topics:
    """A pipeline's topics, created by the admin with the settings the processor gives them."""
    topics = new_topics(secured.admin_bootstrap, "kafka", -1)
    futures = secured.cluster.admin().create_topics(
        [
            NewTopic(topics.input, 4, 1),
            NewTopic(topics.output, 1, 1, config={"cleanup.policy": "compact"}),
            NewTopic(topics.dlq, 1, 1),
            NewTopic(topics.partials, 1, 1, config={"message.timestamp.type": "LogAppendTime"}),
        ]
    )
    for future in futures.values():
        future.result(10)
    return topics


def refusal(missing: list[Permission], user: str) -> str:
    """The line a program run as `user` says when the cluster lacks `missing`."""
    return NotAuthorized(missing, Settings(kafka_common={"sasl.username": user})).line()


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ---- the pipeline with exactly its ACLs ------------------------------------------------------


@dataclass
class Pipeline:
    topics: Topics
    settings: Settings
    expected: dict
    invalid: int
    log_mark: int  # where the node's log stood before the programs ran


@pytest.fixture(scope="module")
def pipeline(secured, tmp_path_factory) -> Pipeline:
    """The generator, the processor and the monitor, each as its own user with exactly its
    ACLs: a backlog written, its windows published, the processor stopped."""
    secured.revoke_everything()
    mark = secured.log_mark()
    tmp_path = tmp_path_factory.mktemp("pipeline")
    topics = created_topics(secured)
    settings = settings_of(topics)
    secured.grant("generator", authorization.generator(settings))
    secured.grant("processor", authorization.processor(settings))
    secured.grant("monitor", authorization.monitor(settings))
    generated = run_script(
        "data_generator.py",
        *("--count", "3000", "--backlog-seconds", "120", "--seed", "29"),
        env=secured.env("generator", topics),
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    records = read_topic(secured.admin_bootstrap, topics.input)
    assert len(records) == 3000
    expected = expected_windows([(m.value(), m.timestamp()[1]) for m in records])
    invalid = sum(window["invalid_message_count"] for window in expected.values())
    processor = ProcessorProcess(secured.env("processor", topics), tmp_path / "processor.log")
    try:
        wait_until(
            lambda: len({m.key() for m in read_topic(secured.admin_bootstrap, topics.output)}) >= len(expected),
            timeout=90,
            interval=1.0,
            message="every window",
        )
        code, _ = processor.terminate()
        assert code == 0, processor.log()
    finally:
        processor.stop_quietly()
    assert "not authorized" not in processor.log() and "Traceback" not in processor.log(), processor.log()
    return Pipeline(topics, settings, expected, invalid, mark)


def test_the_pipeline_is_exact_with_exactly_the_acls_of_each_role(secured, pipeline, tmp_path):
    topics = pipeline.topics
    published = {m.key().decode(): json.loads(m.value()) for m in read_topic(secured.admin_bootstrap, topics.output)}
    assert published == pipeline.expected
    # The invalid records reached the DLQ (the processor's Write there was used).
    assert pipeline.invalid > 0
    assert len(read_topic(secured.admin_bootstrap, topics.dlq)) == pipeline.invalid
    # The monitor, as its own user, shows the same windows (from its newest: the last one).
    monitor = run_script(
        "monitor_aggregated_data.py",
        *("--json", "--exit-after", "1", "--idle-timeout", "20"),
        env=secured.env("monitor", topics),
        cwd=tmp_path,
    )
    assert monitor.returncode == 0, monitor.stderr
    shown = [json.loads(line) for line in monitor.stdout.strip().splitlines()]
    newest = max(pipeline.expected)
    assert shown == [pipeline.expected[newest]]
    # Nothing any of them asked for was refused: the ACLs cover every request they made.
    for user in ("generator", "processor", "monitor"):
        assert secured.denials(user, since=pipeline.log_mark) == [], user


def test_the_monitors_user_cannot_write_anywhere(secured, pipeline):
    """With the monitor's ACLs, every topic of the cluster refuses its records, a new topic
    cannot be made, no topic's configuration changed nor any topic deleted, and the
    pipeline's group takes no offsets from it."""
    topics = pipeline.topics
    client = {**secured.client("monitor"), "log_level": 2}
    everywhere = sorted(secured.cluster.admin().list_topics(timeout=10).topics)
    assert {topics.input, topics.output, topics.dlq, topics.partials, "__consumer_offsets"} <= set(everywhere)
    outcomes: dict[str, KafkaError | None] = {}
    producer = Producer({**client, "message.timeout.ms": 10000})
    for topic in [*everywhere, f"new-{uuid.uuid4().hex[:8]}"]:
        producer.produce(topic, b"from the monitor", on_delivery=lambda error, m, t=topic: outcomes.update({t: error}))
    producer.flush(20)
    assert len(outcomes) == len(everywhere) + 1
    for topic, error in outcomes.items():
        assert error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, (topic, error)

    admin = AdminClient(client)
    created = admin.create_topics([NewTopic(f"made-by-monitor-{uuid.uuid4().hex[:8]}", 1, 1)])
    for future in created.values():
        with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
            future.result(15)
    change = ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topics.output, incremental_configs=[change])
    with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
        admin.incremental_alter_configs([resource])[resource].result(15)
    for future in admin.delete_topics([topics.output], operation_timeout=10).values():
        with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
            future.result(15)
    offsets = ConsumerGroupTopicPartitions(topics.group, [TopicPartition(topics.input, 0, 0)])
    for future in admin.alter_consumer_group_offsets([offsets]).values():
        with pytest.raises(KafkaException, match="GROUP_AUTHORIZATION_FAILED"):
            future.result(15)


# ---- each ACL missing in turn: the processor ---------------------------------------------------

PROCESSOR_NEEDS = authorization.processor(Settings())


@pytest.mark.parametrize("dropped", range(len(PROCESSOR_NEEDS)), ids=[str(p) for p in PROCESSOR_NEEDS])
def test_a_processor_missing_one_acl_stops_at_start_with_one_line_naming_it(acls, tmp_path, dropped):
    topics = created_topics(acls)
    needs = authorization.processor(settings_of(topics))
    missing = needs.pop(dropped)
    acls.grant("processor", needs)
    started = time.monotonic()
    result = run_script("kafka_processor.py", env=acls.env("processor", topics), cwd=tmp_path, timeout=30)
    elapsed = time.monotonic() - started
    print(missing, result.returncode, f"{elapsed:.1f}s", result.stderr.strip())
    assert result.returncode == 2, result.stderr
    line = one_line(result.stderr)
    assert line == f"kafka_processor.py: {refusal([missing], 'processor')}"
    assert elapsed < 20


def test_a_processor_that_may_not_create_its_missing_topics_says_which(acls, tmp_path):
    """Without Create, missing topics are a stop naming each (they used to be a traceback);
    with Create on them, it makes them, the partials topic stamped with the broker's time."""
    topics = new_topics(acls.admin_bootstrap, "kafka", -1)  # none of them exists
    settings = settings_of(topics)
    acls.grant("processor", authorization.processor(settings))
    result = run_script("kafka_processor.py", env=acls.env("processor", topics), cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stderr
    names = (topics.input, topics.output, topics.dlq, topics.partials)
    wanted = refusal([Permission(TOPIC, name, "Create") for name in names], "processor")
    assert one_line(result.stderr) == f"kafka_processor.py: {wanted}"

    acls.grant("processor", [Permission(TOPIC, name, "Create") for name in names])
    processor = ProcessorProcess(acls.env("processor", topics), tmp_path / "processor.log")
    try:
        processor.wait_for_log("consuming", timeout=30)
    finally:
        processor.stop_quietly()
    resource = ConfigResource(ResourceType.TOPIC, topics.partials)
    configs = acls.cluster.admin().describe_configs([resource])[resource].result(10)
    assert configs["message.timestamp.type"].value == "LogAppendTime"


def test_an_acl_removed_under_a_running_processor_stops_it_with_one_line(acls, tmp_path):
    """Not retried for ever: within the watch's period it stops, committing nothing more,
    exit 2, one line naming what is missing. Given the ACL back, a new run goes on exact."""
    topics = created_topics(acls)
    settings = settings_of(topics)
    acls.grant("processor", authorization.processor(settings))
    acls.grant("generator", authorization.generator(settings))
    generated = run_script(
        "data_generator.py",
        *("--count", "2000", "--backlog-seconds", "90", "--seed", "31"),
        env=acls.env("generator", topics),
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    records = read_topic(acls.admin_bootstrap, topics.input)
    expected = expected_windows([(m.value(), m.timestamp()[1]) for m in records])
    processor = ProcessorProcess(acls.env("processor", topics), tmp_path / "processor.log")
    try:
        wait_until(
            lambda: len({m.key() for m in read_topic(acls.admin_bootstrap, topics.output)}) >= len(expected),
            timeout=60,
            message="every window",
        )
        write = Permission(TOPIC, topics.output, "Write")
        acls.revoke("processor", [write])
        revoked = time.monotonic()
        code = processor.wait(authorization.WATCH_SECONDS + 20)
        print(f"stopped {time.monotonic() - revoked:.1f}s after the ACL was removed, exit {code}")
    finally:
        processor.stop_quietly()
    assert code == 2, processor.log()
    said = [line for line in processor.log().splitlines() if "not authorized" in line]
    assert len(said) == 1, processor.log()
    assert refusal([write], "processor") in said[0]
    assert "stopping without committing anything more" in said[0]
    assert "Traceback" not in processor.log()

    acls.grant("processor", [write])
    again = ProcessorProcess(acls.env("processor", topics), tmp_path / "again.log")
    try:
        again.wait_for_log("consuming", timeout=30)
        assert again.terminate()[0] == 0
    finally:
        again.stop_quietly()
    published = {m.key().decode(): json.loads(m.value()) for m in read_topic(acls.admin_bootstrap, topics.output)}
    assert published == expected


def test_a_createtime_partials_topic_it_may_not_alter_is_named_in_one_warning(acls, tmp_path):
    """AlterConfigs is not in the processor's list: needed only to restamp a partials
    topic made with CreateTime. Without it the processor says which ACL, and runs."""
    topics = new_topics(acls.admin_bootstrap, "kafka", -1)
    # The partials topic as the broker makes it by default: CreateTime.
    names = (topics.input, topics.output, topics.dlq, topics.partials)
    futures = acls.cluster.admin().create_topics([NewTopic(name, 1, 1) for name in names])
    for future in futures.values():
        future.result(10)
    acls.grant("processor", authorization.processor(settings_of(topics)))
    processor = ProcessorProcess(acls.env("processor", topics), tmp_path / "processor.log")
    try:
        processor.wait_for_log("consuming", timeout=30)
    finally:
        processor.stop_quietly()
    warnings = [line for line in processor.log().splitlines() if "could not set message.timestamp.type" in line]
    assert len(warnings) == 1, processor.log()
    assert f"(not authorized: AlterConfigs on topic {topics.partials})" in warnings[0]


# ---- the generator and the monitor -------------------------------------------------------------


def test_the_generator_missing_its_acls_says_which_in_one_line(acls, tmp_path):
    topics = created_topics(acls)
    result = run_script("data_generator.py", "--count", "10", env=acls.env("generator", topics), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    write = Permission(TOPIC, topics.input, "Write")
    assert one_line(result.stderr) == f"data_generator.py: {refusal([write], 'generator')}"
    # A missing input it may see (Write implies Describe) but not create.
    other = new_topics(acls.admin_bootstrap, "kafka", -1)
    acls.grant("generator", [Permission(TOPIC, other.input, "Write")])
    result = run_script("data_generator.py", "--count", "10", env=acls.env("generator", other), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    create = Permission(TOPIC, other.input, "Create")
    assert one_line(result.stderr) == f"data_generator.py: {refusal([create], 'generator')}"


def test_write_or_read_taken_from_a_running_generator_and_monitor_stops_each_with_one_line(acls, tmp_path):
    """Not retried, not dropped unseen: the first record refused stops the generator, the
    first read refused stops the monitor, exit 2, each with the line naming what it lacks."""
    topics = created_topics(acls)
    settings = settings_of(topics)
    acls.grant("generator", authorization.generator(settings))
    acls.grant("monitor", authorization.monitor(settings))
    started = []
    for name, script, args in (
        ("generator", "data_generator.py", ("--rate", "50")),
        ("monitor", "monitor_aggregated_data.py", ("--json",)),
    ):
        started.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / script), *args],
                cwd=tmp_path,
                env=acls.env(name, topics),
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115 - closed with the process
            )
        )
    try:
        wait_until(lambda: read_topic(acls.admin_bootstrap, topics.input), 20, message="the generator writing")
        time.sleep(2)  # the monitor reading
        assert all(process.poll() is None for process in started)
        write, read = Permission(TOPIC, topics.input, "Write"), Permission(TOPIC, topics.output, "Read")
        acls.revoke("generator", [write])
        acls.revoke("monitor", [read])
        codes = [process.wait(30) for process in started]
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
    assert codes == [2, 2]
    for name, script, missing in (
        ("generator", "data_generator.py", write),
        ("monitor", "monitor_aggregated_data.py", read),
    ):
        log = (tmp_path / f"{name}.log").read_text()
        said = [line for line in log.splitlines() if "not authorized" in line]
        assert said == [f"{script}: {refusal([missing], name)}"], log
        assert "Traceback" not in log


MONITOR_NEEDS = authorization.monitor(Settings())


@pytest.mark.parametrize("dropped", range(len(MONITOR_NEEDS)), ids=[str(p) for p in MONITOR_NEEDS])
def test_a_monitor_missing_one_acl_stops_with_one_line_naming_it(acls, tmp_path, dropped):
    topics = created_topics(acls)
    settings = settings_of(topics)
    needs = authorization.monitor(settings)
    missing = needs.pop(dropped)
    acls.grant("monitor", needs)
    result = run_script(
        "monitor_aggregated_data.py", "--json", env=acls.env("monitor", topics), cwd=tmp_path, timeout=30
    )
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == f"monitor_aggregated_data.py: {refusal([missing], 'monitor')}"


# ---- the ops tools ------------------------------------------------------------------------------


@dataclass
class Recovery:
    """What the ops tools work on: the pipeline's DLQ, a fixed export of it, a staging
    topic holding the output's windows, a finished recomputation's groups."""

    fixed: Path
    staging: str
    group: str


@pytest.fixture(scope="module")
def recovery(secured, pipeline, tmp_path_factory) -> Recovery:
    directory = tmp_path_factory.mktemp("recovery")
    topics = pipeline.topics
    admin = secured.cluster.admin()
    ledger = f"{topics.dlq}-replayed"
    tag = uuid.uuid4().hex[:8]
    staging, group = f"staging-{tag}", f"recompute-{tag}"
    futures = admin.create_topics(
        [
            NewTopic(ledger, 1, 1, config={"cleanup.policy": "compact"}),
            NewTopic(staging, 1, 1),
            NewTopic(f"{group}-partials", 1, 1),
        ]
    )
    for future in futures.values():
        future.result(10)
    # The windows a recomputation under `group` publishes: the output's, under its name.
    producer = Producer({"bootstrap.servers": secured.admin_bootstrap, "log_level": 2})
    for message in read_topic(secured.admin_bootstrap, topics.output):
        headers = [(k, group.encode() if k == "pipeline.group" else v) for k, v in message.headers() or []]
        producer.produce(staging, key=message.key(), value=message.value(), headers=headers)
    assert producer.flush(10) == 0
    for name in (group, f"{group}-merge"):  # a recomputation's groups, with committed offsets
        consumer = Consumer({"bootstrap.servers": secured.admin_bootstrap, "group.id": name, "log_level": 2})
        consumer.commit(offsets=[TopicPartition(topics.input, 0, 0)], asynchronous=False)
        consumer.close()
    # The DLQ's records, exported by the admin and fixed, as an operator would.
    plain = topics.env()
    exported = directory / "dlq.jsonl"
    result = run_module("ops.dlq_replay", "export", str(exported), env=plain)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in exported.read_text().splitlines()]
    assert len(lines) == pipeline.invalid
    now = int(time.time())
    for number, line in enumerate(lines):
        line.pop("value_base64", None)
        line["value"] = json.dumps({"device_type": "android", "device_id": f"fixed-{number}", "timestamp": now})
    fixed = directory / "fixed.jsonl"
    fixed.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return Recovery(fixed, staging, group)


def run_module(module: str, *args: str, env: dict[str, str]):
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def tool_cases(pipeline: Pipeline, recovery: Recovery) -> dict[str, tuple[list[str], list[Permission]]]:
    """{case: (command line, the permissions it needs)} of every ops tool."""
    s = pipeline.settings
    cleanup_topics = [recovery.staging, f"{recovery.group}-partials"]
    cleanup_flags = ["--group", recovery.group, *(arg for t in cleanup_topics for arg in ("--topic", t))]
    return {
        "dlq-export": (["ops.dlq_replay", "export", "-"], authorization.dlq_replay(s, "export")),
        "dlq-replay-dry-run": (
            ["ops.dlq_replay", "replay", str(recovery.fixed), "--dry-run"],
            authorization.dlq_replay(s, "replay", dry_run=True),
        ),
        "dlq-replay": (["ops.dlq_replay", "replay", str(recovery.fixed)], authorization.dlq_replay(s, "replay")),
        "dlq-discard": (["ops.dlq_replay", "discard", str(recovery.fixed)], authorization.dlq_replay(s, "discard")),
        "recompute": (
            ["ops.recompute", "--source", recovery.staging, "--from", min(pipeline.expected)],
            authorization.recompute(s, recovery.staging),
        ),
        "recompute-cleanup": (
            ["ops.recompute_cleanup", *cleanup_flags],
            authorization.recompute_cleanup(recovery.group, cleanup_topics),
        ),
    }


def tool_case_ids() -> list[tuple[str, int]]:
    """(case, index of the permission left out) for every case, from the default names."""
    fake = Pipeline(Topics("", "i", "o", "d", "g"), Settings(), {"2026-01-01T00:00:00Z": {}}, 0, 0)
    cases = tool_cases(fake, Recovery(Path("f"), "s", "r"))
    return [(case, index) for case, (_, needs) in cases.items() for index in range(len(needs))]


@pytest.mark.parametrize(("case", "dropped"), tool_case_ids(), ids=[f"{c}-{i}" for c, i in tool_case_ids()])
def test_an_ops_tool_missing_one_acl_stops_with_one_line_naming_it(acls, pipeline, recovery, case, dropped):
    command, needs = tool_cases(pipeline, recovery)[case]
    missing = needs.pop(dropped)
    acls.grant("ops", needs)
    result = run_module(*command, env=acls.env("ops", pipeline.topics))
    print(case, missing, result.returncode, result.stderr.strip())
    assert result.returncode == 2, (result.stdout, result.stderr)
    prog = f"python -m {command[0]}"
    assert one_line(result.stderr) == f"{prog}: {refusal([missing], 'ops')}"


def test_the_ops_tools_work_with_exactly_their_acls(acls, pipeline, recovery):
    """Export, replay, recompute and clean up, each as the `ops` user with exactly the
    ACLs its command needs; the broker refuses it nothing."""
    cases = tool_cases(pipeline, recovery)
    mark = acls.log_mark()
    outcomes = {}
    for case in ("dlq-export", "dlq-replay", "recompute", "recompute-cleanup"):
        command, needs = cases[case]
        acls.revoke_everything()
        acls.grant("ops", needs)
        result = run_module(*command, env=acls.env("ops", pipeline.topics))
        assert result.returncode == 0, (case, result.stdout, result.stderr)
        outcomes[case] = result
    assert outcomes["dlq-export"].stdout.count("\n") == pipeline.invalid
    assert f"sent {pipeline.invalid} record(s), skipped 0" in outcomes["dlq-replay"].stdout
    windows = len(pipeline.expected)
    assert f"copied {windows} window(s) from {recovery.staging}" in outcomes["recompute"].stdout
    assert f"{windows} same" in outcomes["recompute"].stdout
    assert "deleted 2 topic(s) and 2 group(s)" in outcomes["recompute-cleanup"].stdout
    replayed = [
        m
        for m in read_topic(acls.admin_bootstrap, pipeline.topics.input)
        if dict(m.headers() or []).get("dlq.replayed.from")
    ]
    assert len(replayed) == pipeline.invalid
    assert acls.denials("ops", since=mark) == []
