"""The KIP-848 consumer group protocol (`KAFKA_GROUP_PROTOCOL=consumer`), on real brokers.

On Apache Kafka 4.x the processor runs under it: the settings librdkafka forbids in
that mode are left out (and said so), rebalances hand over only the change, the
processor's own start offsets (`auto.offset.reset=latest`) go through
`incremental_assign`, and the merge moves to another member when the merger dies. On
a broker without it (the embedded Tansu) the setting is refused in one line, exit 2:
librdkafka alone would wait for ever without a word. (The chaos test runs under it
too: tests/test_chaos.py.)
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from broker.apache_kafka import KafkaCluster
from testkit.oracle import expected_windows
from testkit.processes import ROOT, aligned_past, latest_by_key, new_topics, produce, wait_until
from tests.test_chaos import LiveStream, merger_of

pytestmark = [pytest.mark.broker]

WINDOW, LATENESS = 5, 2


def published(topics) -> dict[str, dict]:
    return {key: json.loads(value) for key, value in latest_by_key(topics.bootstrap, topics.output).items()}


@pytest.mark.parametrize("variable", ["KAFKA_GROUP_PROTOCOL", "KAFKA_CONSUMER_GROUP_PROTOCOL"])
def test_on_a_broker_without_kip848_the_consumer_protocol_is_a_bad_setting_in_one_line(topics, variable):
    """Tansu 0.6.0 lacks ConsumerGroupHeartbeat. librdkafka gives up on its coordinator
    and says so only in its debug log: the processor would sit outside its group for
    ever, looking healthy."""
    topics.create()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(ROOT / "kafka_processor.py")],
        env=topics.env(**{variable: "consumer"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - started
    print(f"refused in {took:.1f}s")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"kafka_processor.py: bad setting {variable}: 'consumer' (KIP-848) is not supported by the broker at"
        f" {topics.bootstrap} (it lacks the ConsumerGroupHeartbeat request"
    ), result.stderr


@pytest.mark.kafka
def test_under_kip848_processors_share_a_live_stream_hand_over_only_the_change_and_the_merge(
    kafka_node: KafkaCluster, start_processor
):
    topics = new_topics(kafka_node.bootstrap_servers, "kafka", -1)
    topics.create(input_partitions=4)
    # Topics.env sets KAFKA_SESSION_TIMEOUT_MS=6000, which this mode forbids: left out.
    env = topics.env(
        KAFKA_GROUP_PROTOCOL="consumer", WINDOW_SECONDS=str(WINDOW), ALLOWED_LATENESS_SECONDS=str(LATENESS)
    )
    first = start_processor(env)
    first.wait_for_log("assigned all 4 partitions", timeout=60)
    settings_line = next(line for line in first.log().splitlines() if "consuming " in line)
    assert settings_line.endswith(
        "group.protocol=consumer left out session.timeout.ms=6000 (the broker sets the session:"
        " group.consumer.session.timeout.ms))"
    ), settings_line
    stream = LiveStream(topics.bootstrap, topics.input, 4, per_second=200, seed=3).start()
    time.sleep(3)
    second = start_processor(env)
    second.wait_for_log("assigned partitions", timeout=60)
    first.wait_for_log("revoked", timeout=30)
    # The first member gave up only what moved, and kept the rest (with its open windows).
    revoked = re.findall(r"partition\(s\) ([\d,]+) revoked", first.log())
    assert revoked and all(len(found.split(",")) < 4 for found in revoked), revoked
    description = kafka_node.admin().describe_consumer_groups([topics.group])[topics.group].result(10)
    assert description.type.name == "CONSUMER" and len(description.members) == 2
    time.sleep(3)
    merger = wait_until(lambda: merger_of([first, second]), 30, message="a merger")
    merger.kill()
    survivor = second if merger is first else first
    survivor.wait_for_log("this processor is now the merger", timeout=60)
    third = start_processor(env)  # joins, and takes partitions from the survivor
    third.wait_for_log("assigned partitions", timeout=60)
    time.sleep(3)
    stream.stop()
    expected = expected_windows(stream.records, window=WINDOW)
    got = wait_until(lambda: (p := published(topics)) == expected and p, 90, message="the oracle's windows")
    assert sum(w["message_count"] for w in got.values()) == len(stream.records)
    # Both stopped at once, as `docker compose down` does: the one that leaves last is given
    # the other's partitions while it shuts down, and its last poll serves that assignment
    # and its own revocation together. It aborted there (exit -6, confluent-kafka's
    # CallState_get) when its assignment callback had asked its consumer for metadata.
    for processor in (survivor, third):
        processor.process.send_signal(signal.SIGTERM)
    codes = [processor.wait(30) for processor in (survivor, third)]
    assert codes == [0, 0], (survivor.log()[-3000:], third.log()[-3000:])


@pytest.mark.kafka
def test_under_kip848_a_new_group_with_offset_reset_latest_starts_at_the_end(kafka_node: KafkaCluster, start_processor):
    """The processor applies `latest` itself by setting start offsets inside the rebalance
    callback: with `assign()` there, librdkafka refused (_STATE, "Erroneous state") and
    the processor stopped at its first assignment."""
    topics = new_topics(kafka_node.bootstrap_servers, "kafka", -1)
    topics.create(input_partitions=2)
    old = aligned_past(5, WINDOW)
    produce(topics.bootstrap, topics.input, [(p, b'{"device_type": "iOS"}', old * 1000) for p in (0, 1)])
    env = topics.env(
        KAFKA_GROUP_PROTOCOL="consumer",
        KAFKA_AUTO_OFFSET_RESET="latest",
        WINDOW_SECONDS=str(WINDOW),
        ALLOWED_LATENESS_SECONDS=str(LATENESS),
    )
    processor = start_processor(env)
    processor.wait_for_log("assigned all 2 partitions", timeout=60)
    now = int(time.time())
    records = [(p, json.dumps({"device_type": "web", "timestamp": now}).encode(), now * 1000) for p in (0, 1)]
    produce(topics.bootstrap, topics.input, records)
    expected = expected_windows([(value, ms) for _, value, ms in records], window=WINDOW)
    wait_until(lambda: published(topics) == expected, 60, message="the new records' window alone")
    code, _ = processor.terminate()
    assert code == 0, processor.log()
