"""pipeline_topics: what the output topic says a pipeline has published, read from its
records (no broker: real `Message` objects)."""

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
