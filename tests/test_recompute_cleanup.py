"""ops.recompute_cleanup without a broker: it never deletes the live pipeline's topics or
groups (one line naming the flag, exit 2, before it connects), and it tells whose a
topic is from its records. Deleting, against a real broker: tests/test_recovery.py."""

from __future__ import annotations

import pytest
from confluent_kafka import Message

from broker.pipeline_topics import output_headers
from config import Settings
from merging.parts import PartOrigin, encode_progress
from ops.recompute_cleanup import main, named_group

# Nothing listens here: a test that reached the broker would fail, not hang.
LIVE = [
    "--env-file",
    "",
    "--bootstrap-servers",
    "127.0.0.1:1",
    "--consumer-group-id",
    "login-aggregator",
    "--dlq-topic",
    "user-login-dlq",
]


@pytest.mark.parametrize(
    ("request_", "named"),
    [
        (["--group", "login-aggregator"], "--group: login-aggregator is the live pipeline's group"),
        (["--group", "login-aggregator-merge"], "--group: login-aggregator-merge is the live pipeline's group"),
        (["--group", "r1", "--topic", "device-login-aggregates"], "the live pipeline's OUTPUT_TOPIC"),
        (["--group", "r1", "--topic", "r1-out", "--topic", "user-login"], "the live pipeline's INPUT_TOPIC"),
        (["--group", "r1", "--topic", "user-login-dlq"], "the live pipeline's DLQ_TOPIC"),
        (["--group", "r1", "--topic", "login-aggregator-partials"], "the live pipeline's PARTIALS_TOPIC"),
        (["--group", "r1", "--topic", "user-login-dlq-replayed"], "the live pipeline's the DLQ replay's ledger"),
    ],
)
def test_the_live_pipelines_topics_and_groups_are_refused(capsys, request_, named):
    with pytest.raises(SystemExit) as exited:
        main([*request_, *LIVE])
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m ops.recompute_cleanup: bad setting --") and named in line, line


def test_a_record_names_its_pipeline_by_header_or_partials_origin():
    settings = Settings(consumer_group_id="login-recompute-1")
    window = Message(topic="out", key=b"2026-12-01T00:00:00Z", value=b"{}", headers=output_headers(settings, 4))
    progress = Message(topic="p", value=encode_progress(0, 4, 1_796_083_200, PartOrigin("user-login", "g2", {})))
    assert named_group(window) == "login-recompute-1"
    assert named_group(progress) == "g2"
    assert named_group(Message(topic="dlq", value=b"{not json")) == ""  # names nobody
