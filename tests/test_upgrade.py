"""A rolling upgrade (real broker): a running group of two processors of an earlier
release is upgraded one member at a time, on a live stream, with parts of both
releases on the partials topic; every window comes out exact, and nothing stops.

The earlier releases are taken from this repository's history (`git archive`), so the
test runs the code people have deployed, not a model of it: 0.1.0, whose partials
records lack the pipeline and settings fields appended since and whose default
PARTIALS_TOPIC was shared by every group (an upgrade pins the topic for its duration,
as docs/operations.md says); and the code before this release's fields (offsets the
parts counted up to, settings on the output), whose records lack those. Older readers
ignore trailing fields and headers; newer ones read their absence as "unknown".
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
from testkit.oracle import expected_windows
from testkit.processes import ROOT, latest_by_key, read_topic, wait_until
from tests.test_chaos import LiveStream

pytestmark = [pytest.mark.broker, pytest.mark.slow]

EARLIER_RELEASES = {
    "0.1.0": "e52373f",  # the last commit of the release before the pipeline identity
    "pipeline-identity": "8410343",  # the last landing before accounted offsets and settings on the output
}
NEWEST_EARLIER_RELEASE = "pipeline-identity"


@pytest.fixture(scope="module", params=sorted(EARLIER_RELEASES))
def previous_release(request, tmp_path_factory):
    """An earlier release's files, unpacked from git."""
    commit = EARLIER_RELEASES[request.param]
    try:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        message = f"the earlier release ({commit}) is not in this clone's history: {error}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must clone with history)")
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


@pytest.mark.both_brokers
def test_a_group_upgraded_one_member_at_a_time_publishes_every_window_exactly(
    topics, start_processor, previous_release, request
):
    release = request.node.callspec.params["previous_release"]
    if topics.broker == "kafka" and release != NEWEST_EARLIER_RELEASE:
        # The suite's time budget: on Kafka the upgrade from the newest earlier release;
        # from every earlier one on the embedded broker.
        pytest.skip(f"on Apache Kafka the upgrade runs from {NEWEST_EARLIER_RELEASE} only")
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
    kinds = {piece.accounted_to >= 0 for piece in pieces if isinstance(piece, PartPiece)}
    assert kinds == {False, True}, "parts of both releases on the partials topic"
    for member in members:
        assert member.terminate()[0] == 0, member.log()
        assert "Traceback" not in member.log()
