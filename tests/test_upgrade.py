"""A rolling upgrade (real broker): a running group of two processors of the previous
release is upgraded one member at a time, on a live stream, with parts of both
releases on the partials topic; every window comes out exact, and nothing stops.

The previous release is taken from this repository's history (`git archive`), so the
test runs the code people have deployed, not a model of it. Its partials records
lack the pipeline and settings fields this release appends (older readers ignore
trailing fields, newer ones read their absence as "unknown"), and its default
PARTIALS_TOPIC was shared by every group: an upgrade pins the topic for its duration,
as docs/operations.md says.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import time

import pytest

from merging.parts import PartPiece, decode_partial
from tests.conftest import ROOT, latest_by_key, read_topic, wait_until
from tests.oracle import expected_windows
from tests.test_chaos import LiveStream

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PREVIOUS_RELEASE = "e52373f"  # the last commit of the release before the pipeline identity (0.1.0)


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """The previous release's files, unpacked from git."""
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", PREVIOUS_RELEASE], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        message = f"the previous release ({PREVIOUS_RELEASE}) is not in this clone's history: {error}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must clone with history)")
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_a_group_upgraded_one_member_at_a_time_publishes_every_window_exactly(
    topics, start_processor, previous_release
):
    topics.create(input_partitions=6)
    env = topics.env(WINDOW_SECONDS="5", ALLOWED_LATENESS_SECONDS="2")  # PARTIALS_TOPIC pinned by topics.env
    old = previous_release / "kafka_processor.py"
    members = [start_processor(env, old), start_processor(env, old)]
    for member in members:
        member.wait_for_log("assigned", timeout=30)
    stream = LiveStream(topics.bootstrap, topics.input, 6, per_second=200, seed=5).start()
    for index in range(2):  # one member at a time: stop the old one, start the new one
        time.sleep(8)
        code, _ = members[index].terminate()
        assert code == 0, members[index].log()
        members[index] = start_processor(env)
        members[index].wait_for_log("assigned", timeout=30)
    time.sleep(8)
    stream.stop()
    expected = expected_windows(stream.records, window=5)

    def published() -> dict[str, dict]:
        return {key: json.loads(value) for key, value in latest_by_key(topics.bootstrap, topics.output).items()}

    wait_until(lambda: published() == expected, 60, message="every window, exact")
    pieces = [decode_partial(m.value()) for m in read_topic(topics.bootstrap, topics.partials)]
    kinds = {piece.origin.known for piece in pieces if isinstance(piece, PartPiece)}
    assert kinds == {False, True}, "parts of both releases on the partials topic"
    for member in members:
        assert member.terminate()[0] == 0, member.log()
        assert "Traceback" not in member.log()
