"""pipeline_topics: what the output topic says a pipeline has published, read from its
records (no broker: real `Message` objects); and, on Apache Kafka, that the topics it
creates are kept as the docs say (the output really compacted)."""

from __future__ import annotations

import pytest
from confluent_kafka import Message

from broker.pipeline_topics import (
    Published,
    differing_settings,
    newest_published,
    output_headers,
    published_by,
)
from config import ConfigError, build_settings
from core.window_value import iso_utc
from tests.fake_kafka import FakeClients, FakeCluster

W = 30
S = 1_800_000_000 - 1_800_000_000 % 60  # a minute boundary


def settings_of(**env: str):
    return build_settings({"KAFKA_BOOTSTRAP_SERVERS": "fake:9", "INPUT_TOPIC": "in", "CONSUMER_GROUP_ID": "g"} | env)


def window_record(start: int, settings, width: int = W, **accounted: int) -> Message:
    value = f'{{"window_start": "{iso_utc(start)}", "window_end": "{iso_utc(start + width)}"}}'.encode()
    headers = output_headers(settings, 4, {int(p[1:]): o for p, o in accounted.items()})
    return Message(topic="out", partition=0, offset=0, key=iso_utc(start).encode(), value=value, headers=headers)


def test_a_window_ends_after_its_own_length_not_the_readers():
    """A group runs with 30 s windows; the newest published is [S, S+30). A member started
    with 60 took it for [S, S+60): it skipped the records of [S+30, S+60) as replays and
    committed past them before anyone read its error line."""
    group = settings_of(WINDOW_SECONDS="30")
    reader = settings_of(WINDOW_SECONDS="60")
    found = published_by(window_record(S, group), reader)
    assert found.until == S + W
    assert found.shaping["WINDOW_SECONDS"] == 30
    assert differing_settings(found.shaping, reader) == [("WINDOW_SECONDS", 60, 30)]
    assert differing_settings(found.shaping, group) == []


def test_an_older_releases_window_says_its_length_by_its_value():
    reader = settings_of(WINDOW_SECONDS="60")
    old = window_record(S, settings_of())
    old.set_headers([h for h in old.headers() if h[0] not in ("pipeline.settings", "pipeline.accounted")])
    found = published_by(old, reader)
    assert (found.until, found.shaping, found.accounted) == (S + W, None, None)


def test_the_offsets_its_parts_counted_up_to_are_read_per_partition():
    group = settings_of()
    found = published_by(window_record(S, group, p0=120, p3=7), group)
    assert found.accounted == {0: 120, 3: 7}


def test_recomputing_from_a_later_time_under_a_live_group_is_a_bad_setting():
    """`--from` under a group that has published only up to an earlier time took the
    windows between for published: their records were skipped and committed past."""
    live = settings_of()
    cluster = FakeCluster(lambda: S + 10_000.0)
    cluster.create_topic(live.output_topic, 1)
    record = window_record(S, live)
    cluster.append(live.output_topic, 0, record.key(), record.value(), record.headers())
    assert newest_published(live, FakeClients(cluster)).until == S + W
    recompute = settings_of(RECOMPUTE_FROM=str(S + 10 * W))
    with pytest.raises(ConfigError) as refused:
        newest_published(recompute, FakeClients(cluster))
    assert refused.value.setting == "RECOMPUTE_FROM" and "CONSUMER_GROUP_ID of its own" in refused.value.problem
    # A recomputation group that already published from its start resumes.
    again = settings_of(RECOMPUTE_FROM=str(S))
    assert newest_published(again, FakeClients(cluster)) == published_by(record, again)
    # A fresh one starts at its time.
    fresh = settings_of(RECOMPUTE_FROM=str(S + 10 * W), CONSUMER_GROUP_ID="g2")
    assert newest_published(fresh, FakeClients(cluster)) == Published(S + 10 * W, None, None, recomputing=True)


@pytest.mark.broker
@pytest.mark.kafka
@pytest.mark.parametrize("broker_kind", ["kafka"], indirect=True)
def test_kafka_compacts_the_output_to_the_latest_value_of_each_window(topics, start_processor):
    """Apache Kafka only (what the embedded broker compacts, if anything, is not what
    production runs): the processor creates
    the output compacted, the DLQ and partials topics with the retention the docs give
    (docs/operations.md), and publishes every window keyed (Kafka refuses a keyless
    record on a compacted topic: the publish would fail). Then, with segments that roll
    after 100 ms, each window written again with new bytes (as a recomputation's copy
    does): Kafka's log cleaner runs over the output and leaves one record per window,
    the latest."""
    import json
    import time

    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

    from testkit.processes import aligned_past, latest_by_key, produce, read_topic, wait_until
    from testkit.workloads import login_workload

    admin = AdminClient({"bootstrap.servers": topics.bootstrap, "log_level": 2})
    admin.create_topics([NewTopic(topics.input, 2, -1)])[topics.input].result(10)
    records = login_workload(aligned_past(10), seconds=240, count=2000, partitions=2, seed=17)
    produce(topics.bootstrap, topics.input, records)
    processor = start_processor(topics.env())
    published = wait_until(
        lambda: (got := latest_by_key(topics.bootstrap, topics.output)) and len(got) >= 8 and got, 90, message="windows"
    )
    assert processor.terminate()[0] == 0
    first = read_topic(topics.bootstrap, topics.output)
    assert first and all(m.key() for m in first)

    def described(name: str) -> dict[str, str]:
        resource = ConfigResource("topic", name)
        return {k: v.value for k, v in admin.describe_configs([resource])[resource].result(10).items()}

    assert described(topics.output)["cleanup.policy"] == "compact"
    dlq, partials = described(topics.dlq), described(topics.partials)
    assert (dlq["cleanup.policy"], dlq["retention.ms"]) == ("delete", str(14 * 86_400_000))
    assert (partials["cleanup.policy"], partials["retention.ms"]) == ("delete", str(24 * 3_600_000))
    assert partials["message.timestamp.type"] == "LogAppendTime"

    resource = ConfigResource(
        "topic",
        topics.output,
        incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
            for name, value in {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.01"}.items()
        ],
    )
    admin.incremental_alter_configs([resource])[resource].result(10)
    time.sleep(0.3)
    rewritten = {key: json.dumps({**json.loads(value), "rewritten": True}).encode() for key, value in published.items()}
    for key, value in rewritten.items():
        produce(topics.bootstrap, topics.output, [(0, value, int(time.time() * 1000))], key=key.encode())
    for _ in range(2):  # later segments: the rewritten ones are no longer the active one
        time.sleep(0.3)
        produce(topics.bootstrap, topics.output, [(0, b"{}", int(time.time() * 1000))], key=b"roll")

    def compacted() -> list:
        """The output's windows once no window is there twice (each was written twice); [] before."""
        kept = [m for m in read_topic(topics.bootstrap, topics.output) if m.key() != b"roll"]
        return kept if len(kept) == len(rewritten) else []

    # The cleaner looks every 15 s (log.cleaner.backoff.ms).
    kept = wait_until(compacted, 90, interval=2, message="compaction of the output")
    assert {m.key().decode(): m.value() for m in kept} == rewritten  # the latest of each
    print(f"{len(first)} windows, each written again, compacted to {len(kept)}")
