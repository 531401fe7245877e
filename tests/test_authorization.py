"""broker/authorization.py without a broker: what each program needs, how the cluster's
answers are read, the one line, the watch; and docs/operations.md's ACL table against it.
On a real authorizer: tests/test_least_privilege.py."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AclOperation

from broker import authorization
from broker.authorization import GROUP, TOPIC, NotAuthorized, Permission, PermissionWatch, missing_permissions
from config import Settings, build_settings
from testkit.processes import ROOT

SECURED = build_settings(
    {
        "INPUT_TOPIC": "in",
        "OUTPUT_TOPIC": "out",
        "DLQ_TOPIC": "dlq",
        "CONSUMER_GROUP_ID": "g",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_USERNAME": "processor",
        "KAFKA_SASL_PASSWORD": "secret",
    }
)


def answered(operations=None, error: int | None = None) -> Future:
    future: Future = Future()
    if error is not None:
        future.set_exception(KafkaException(KafkaError(error)))
    else:
        future.set_result(type("Description", (), {"authorized_operations": operations})())
    return future


class AnsweringAdmin:
    """Answers DescribeTopics and DescribeGroups from tables: {name: operations or error code}."""

    def __init__(self, topics: dict, groups: dict) -> None:
        self.topics, self.groups = topics, groups
        self.asked: list[tuple[str, list[str]]] = []

    @staticmethod
    def _answer(table: dict, name: str) -> Future:
        value = table[name]
        return answered(error=value) if isinstance(value, int) else answered(value)

    def describe_topics(self, collection, request_timeout, include_authorized_operations):
        assert include_authorized_operations
        self.asked.append(("topics", list(collection.topic_names)))
        return {name: self._answer(self.topics, name) for name in collection.topic_names}

    def describe_consumer_groups(self, groups, request_timeout, include_authorized_operations):
        assert include_authorized_operations
        self.asked.append(("groups", list(groups)))
        return {name: self._answer(self.groups, name) for name in groups}


READ_ONLY = [AclOperation.READ, AclOperation.DESCRIBE]
EVERYTHING = list(AclOperation)


def test_what_the_cluster_does_not_allow_is_missing_and_nothing_else():
    admin = AnsweringAdmin(
        topics={
            "in": READ_ONLY,
            "out": [AclOperation.WRITE, AclOperation.DESCRIBE],  # Read missing
            "dlq": KafkaError.TOPIC_AUTHORIZATION_FAILED,  # refused outright: Write missing
            "g-partials": EVERYTHING,
        },
        groups={
            "g": READ_ONLY,
            "g-merge": KafkaError.GROUP_AUTHORIZATION_FAILED,
            "tail-reader-permission-check": [AclOperation.DESCRIBE],
            "output-follower-permission-check": EVERYTHING,
        },
    )
    missing = missing_permissions(admin, authorization.processor(SECURED))
    assert missing == [
        Permission(TOPIC, "out", "Read"),
        Permission(TOPIC, "dlq", "Write"),
        Permission(GROUP, "g-merge", "Read"),
    ]
    # A prefixed permission is asked about by a name under the prefix.
    assert ("groups", ["g", "g-merge", "output-follower-permission-check", "tail-reader-permission-check"]) in (
        admin.asked
    )


def test_a_missing_topic_or_no_answer_is_not_judged_and_a_broker_that_does_not_tell_passes():
    needs = authorization.generator(SECURED) + authorization.monitor(SECURED, from_beginning=True)
    unknown = AnsweringAdmin(
        topics={"in": KafkaError.UNKNOWN_TOPIC_OR_PART, "out": KafkaError._TIMED_OUT},
        groups={"monitor-permission-check": [AclOperation.DESCRIBE]},
    )
    assert missing_permissions(unknown, needs) == []
    # The embedded broker answers, with no authorized operations: nothing to check against.
    silent = AnsweringAdmin(topics={"in": None, "out": []}, groups={"monitor-permission-check": None})
    assert missing_permissions(silent, needs) is None


def test_the_line_names_each_operation_and_resource_and_the_user_and_no_secret():
    refused = NotAuthorized(
        [Permission(GROUP, "tail-reader-", "Describe", prefixed=True), Permission(TOPIC, "out", "Write")], SECURED
    )
    assert refused.line() == (
        "not authorized: Describe on groups prefixed tail-reader-, Write on topic out (for User:processor):"
        ' the cluster has no ACL allowing it; see docs/operations.md, "Least privilege on Kafka"'
    )
    assert "secret" not in refused.line()
    mutual_tls = NotAuthorized([Permission(TOPIC, "in", "Read")], Settings())
    assert "(for this client's principal)" in mutual_tls.line()


def test_the_watch_stops_at_the_first_refusal_and_ends_where_the_broker_does_not_tell():
    answers = {"in": READ_ONLY}
    admin = AnsweringAdmin(topics=answers, groups={})
    needs = [Permission(TOPIC, "in", "Read")]
    watch = PermissionWatch(SECURED, needs, lambda: admin, every=0.01).start()
    time.sleep(0.1)
    assert watch.refusal is None
    answers["in"] = KafkaError.TOPIC_AUTHORIZATION_FAILED  # the ACL removed
    deadline = time.monotonic() + 5
    while watch.refusal is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watch.refusal is not None and watch.refusal.missing == needs
    watch._thread.join(5)
    assert not watch._thread.is_alive()

    silent = PermissionWatch(SECURED, needs, lambda: AnsweringAdmin({"in": None}, {}), every=0.01).start()
    silent._thread.join(5)
    assert not silent._thread.is_alive() and silent.refusal is None


def test_a_permission_is_a_real_acl():
    with pytest.raises(ValueError):
        Permission(TOPIC, "in", "Fly")
    assert Permission(TOPIC, "in", "DescribeConfigs").acl_operation is AclOperation.DESCRIBE_CONFIGS


def test_the_names_in_the_permissions_are_the_ones_the_programs_use():
    from merging.merger import merge_group_id
    from ops import dlq_replay

    assert Permission(GROUP, merge_group_id(SECURED), "Read") in authorization.processor(SECURED)
    assert Permission(TOPIC, dlq_replay.ledger_topic(SECURED), "Write") in authorization.dlq_replay(SECURED, "replay")
    assert Permission(TOPIC, SECURED.partials_topic, "Write") in authorization.processor(SECURED)


# ---- the table in the docs ---------------------------------------------------------------------


def documented_acls() -> dict[str, set[tuple[str, str, str, bool]]]:
    """{who: {(resource, name, operation, prefixed)}} from docs/operations.md's ACL table."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Least privilege on Kafka", 1)[1].split("\n## ", 1)[0]
    table: dict[str, set] = {}
    who = ""
    for row in re.findall(r"^\|(.+)\|\s*$", section, flags=re.MULTILINE):
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) != 4 or cells[0] == "who" or set("".join(cells)) <= {"-"}:
            continue
        who = cells[0].strip("`") or who
        resource, name, operations = cells[1:]
        prefixed = "prefixed" in name
        name = name.split("`")[1]
        for operation in re.split(r",\s*", operations):
            table.setdefault(who, set()).add((resource, name, operation, prefixed))
    return table


def test_the_docs_list_exactly_the_acls_each_program_needs():
    s = Settings()
    recomputation = Settings(recompute_from=1)
    wanted = {
        "kafka_processor.py": authorization.processor(s),
        "kafka_processor.py --from": [p for p in authorization.processor(recomputation) if p not in wanted_of(s)],
        "monitor_aggregated_data.py": authorization.monitor(s),
        "data_generator.py": authorization.generator(s),
        "ops.dlq_replay export": authorization.dlq_replay(s, "export"),
        "ops.dlq_replay replay": authorization.dlq_replay(s, "replay"),
        "ops.dlq_replay discard": authorization.dlq_replay(s, "discard"),
        "ops.recompute": authorization.recompute(s, "device-login-aggregates-recompute-1"),
        "ops.recompute_cleanup": authorization.recompute_cleanup(
            "login-recompute-1", ["device-login-aggregates-recompute-1", "login-recompute-1-partials"]
        ),
    }
    documented = documented_acls()
    for who, needs in wanted.items():
        assert documented.get(who) == {(p.resource, p.name, p.operation, p.prefixed) for p in needs}, who
    assert set(documented) == set(wanted)


def wanted_of(settings: Settings) -> list[Permission]:
    return authorization.processor(settings)


def test_the_watch_asks_nothing_while_the_cluster_is_not_steady():
    """librdkafka 2.16 can abort the process when a connection drops under a request to
    the group coordinator (issue #4605), seen right after a broker came back: the watch
    waits for a steady cluster before it asks, then finds a removed ACL as before."""
    steady = threading.Event()
    admin = AnsweringAdmin(topics={"in": KafkaError.TOPIC_AUTHORIZATION_FAILED}, groups={"g": READ_ONLY})
    needs = [Permission(TOPIC, "in", "Read"), Permission(GROUP, "g", "Read")]
    watch = PermissionWatch(SECURED, needs, lambda: admin, every=0.01, steady=steady.is_set).start()
    time.sleep(0.2)
    assert admin.asked == [] and watch.refusal is None
    steady.set()
    deadline = time.monotonic() + 5
    while watch.refusal is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert watch.refusal is not None and ("groups", ["g"]) in admin.asked


def test_the_cluster_is_steady_a_while_after_the_last_broker_came_back():
    from broker.kafka_io import BrokerHealth

    health = BrokerHealth("127.0.0.1:9", logging.getLogger("test"), accepts_connections=lambda _node: True)
    assert health.steady_for(60)
    health.on_error(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed"))
    assert not health.steady_for(60)
    health.mark_reachable()
    assert not health.steady_for(60) and health.steady_for(0)
