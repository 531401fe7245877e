"""The merge stage: parts of windows in, the contract's windows out.

Every processor runs one `WindowMerger` thread, a member of a second consumer group
(`CONSUMER_GROUP_ID` + "-merge") over the partials topic, which has one partition:
so Kafka's group protocol makes exactly one member at a time the merger, and moves
the job to another member when that one leaves or dies. Only the merger publishes
to the output topic. The others wait, idle, until Kafka picks them.

The merger publishes a window once every input partition has closed it (merge.py),
waits for the broker's acknowledgement, and only then commits the partials offsets
the published windows no longer need. A new merger (after a crash or a hand-over)
reads the newest window on the output topic, ignores parts of windows up to it, and
rebuilds the rest from the committed partials offset: a window published twice has
the same key and the same bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from aggregator import ClosedWindow, iso_utc
from config import Settings
from kafka_io import BrokerHealth, close_within
from merge import MergeStall, MergeState
from parts import BadPartialRecord, UnknownPartFormat, decode_partial

log = logging.getLogger("merger")

# How long one publish attempt waits for the broker's acknowledgement.
_PUBLISH_ATTEMPT_SECONDS = 5.0
# At shutdown: how long the merger goes on reading the last parts of this processor.
_DRAIN_SECONDS = 5.0
# How long the merge may stand still, with newer parts in, before it says what it waits on.
_STALL_SECONDS = 60.0


def merge_group_id(settings: Settings) -> str:
    return f"{settings.consumer_group_id}-merge"


class WindowMerger:
    """Owns the merge consumer, the output producer and the `MergeState` (this thread
    only); tells the processor what it published through `on_published`."""

    def __init__(
        self,
        settings: Settings,
        consumer_config: dict,
        producer_config: dict,
        health: BrokerHealth,
        published_until: Callable[[], int],
        on_published: Callable[[ClosedWindow, float], None],
        host: str,
    ) -> None:
        self.settings = settings
        self._published_until = published_until
        self._on_published = on_published
        self._host = host.encode()
        self._consumer = Consumer(
            {**consumer_config, "group.id": merge_group_id(settings), "error_cb": health.on_error}
        )
        self._producer = Producer({**producer_config, "error_cb": health.on_error})
        self._state: MergeState | None = None
        self._stall = MergeStall(max(_STALL_SECONDS, 2.0 * settings.window_seconds))
        self._lock = threading.Lock()  # guards _state for metrics readers
        self._in_flight: dict[int, ClosedWindow] = {}
        self._delivered: dict[int, float] = {}
        self._refused: dict[int, str] = {}
        self._committed: int | None = None
        self.stop = threading.Event()  # stop now
        self.drain = threading.Event()  # stop after the parts already written are merged
        self.failed = threading.Event()  # a bug: the processor stops without committing
        self._thread = threading.Thread(target=self._run, name="window-merger", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._consumer.subscribe(
            [self.settings.partials_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._thread.start()

    def finish(self, drain: bool, timeout: float) -> None:
        """Stop the thread: after merging what is already on the partials topic (a
        clean shutdown), or at once (a crash: nothing more is committed)."""
        (self.drain if drain else self.stop).set()
        self._thread.join(timeout)

    @property
    def is_merger(self) -> bool:
        return self._state is not None

    def merge_lag_seconds(self) -> float | None:
        """Newest part's window end minus the newest published window's end."""
        with self._lock:
            state = self._state
            if state is None or state.newest_part_end() is None:
                return None
            return max(0.0, float(state.newest_part_end() - state.published_until))

    # ---- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        drain_until, drain_to = None, None
        try:
            while not self.stop.is_set():
                if self.drain.is_set() and drain_until is None:
                    drain_until = time.monotonic() + _DRAIN_SECONDS
                    drain_to = self._end_offset()
                messages = self._consumer.consume(1000, 0.2)
                for message in messages:
                    self._add(message)
                self._publish_due()
                self._warn_if_stalled()
                if drain_until is not None and (
                    time.monotonic() > drain_until or (not self._in_flight and self._read_to(drain_to))
                ):
                    break
        except Exception:
            log.exception("merger crashed; nothing more is committed")
            self.failed.set()
            self.stop.set()
        finally:
            self._close()

    def _warn_if_stalled(self) -> None:
        """Name what the merge waits on when it has stood still for long (`MergeStall`)."""
        state = self._state
        if state is None or not self._stall.due(time.monotonic(), state.published_until, state.pending_windows()):
            return
        closed = state.closed_until()
        holding = [
            f"{p} (closed up to {iso_utc(closed[p])})" if p in closed else f"{p} (no window closed there yet)"
            for p in state.holding_partitions()
        ]
        incomplete = [
            f"partition {p} of window {iso_utc(start)} ({received} of {pieces} pieces)"
            for start, p, received, pieces in state.incomplete_parts()[:3]
        ]
        log.warning(
            "no window published for %.0fs or more although %d window(s) up to %s wait: waiting for input"
            " partition(s) %s%s; their processor is stuck or far behind",
            self._stall.after_seconds,
            state.pending_windows(),
            iso_utc(state.newest_part_end() or state.published_until),
            ", ".join(holding) or "none",
            "; incomplete: " + ", ".join(incomplete) if incomplete else "",
        )

    def _end_offset(self) -> int | None:
        """Where the partials topic ends now (None if not the merger or unknown)."""
        if self._state is None:
            return None
        try:
            return self._consumer.get_watermark_offsets(TopicPartition(self.settings.partials_topic, 0), timeout=2)[1]
        except KafkaException:
            return None

    def _read_to(self, end: int | None) -> bool:
        """Everything before `end` has been read (True when there is nothing to wait for)."""
        if end is None or self._state is None:
            return True
        try:
            [position] = self._consumer.position([TopicPartition(self.settings.partials_topic, 0)])
        except KafkaException:
            return True
        return position.offset >= end

    def _close(self) -> None:
        self._producer.flush(2.0 if not self.failed.is_set() else 0)
        if self.failed.is_set():
            self._state = None  # so that the revoke run by close() commits nothing
        if not close_within(self._consumer, 5.0):
            log.warning("the merge consumer did not leave its group within 5s; going on")

    def _add(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                log.warning("partials topic: %s", error.str())
            return
        state = self._state
        if state is None:
            return  # not (or no longer) the merger
        try:
            record = decode_partial(message.value())
        except UnknownPartFormat:
            # A newer processor's parts: skipping them would publish windows without
            # them. Stop (nothing more is committed) so that a newer member merges.
            log.critical(
                "partials record at offset %d has a newer format than this processor reads; upgrade it",
                message.offset(),
            )
            raise
        except BadPartialRecord as problem:
            log.error("skipping partials record at offset %d: %s", message.offset(), problem)
            return
        with self._lock:
            state.add(record, message.offset())

    def _publish_due(self) -> None:
        state = self._state
        if state is None:
            return
        with self._lock:
            due = state.due_windows()
        published_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
        for window in due:
            if window.start in self._in_flight:
                continue
            try:
                self._producer.produce(
                    self.settings.output_topic,
                    key=window.key,
                    value=window.value,
                    headers=[("processor.host", self._host), ("published.at", published_at)],
                    on_delivery=self._on_delivery(window.start),
                )
            except (KafkaException, BufferError) as error:
                log.error("window %s not queued (%s); trying again", iso_utc(window.start), error)
                break  # in order: nothing is skipped
            self._in_flight[window.start] = window
        if not self._in_flight:
            return
        self._producer.flush(_PUBLISH_ATTEMPT_SECONDS)
        done = [start for start in sorted(self._in_flight) if start in self._delivered]
        for start, reason in list(self._refused.items()):
            log.error("window %s was refused (%s); trying it again", iso_utc(start), reason)
            self._in_flight.pop(start, None)
            del self._refused[start]
        if not done:
            return
        with self._lock:
            state.mark_published(done)
        for start in done:
            self._on_published(self._in_flight.pop(start), self._delivered.pop(start))
        self._commit(state)

    def _on_delivery(self, start: int):
        def report(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                self._delivered[start] = time.time()
            else:
                self._refused[start] = error.str()

        return report

    def _commit(self, state: MergeState) -> None:
        offset = state.committable_offset()
        if offset is None or offset == self._committed:
            return
        try:
            self._consumer.commit(offsets=[TopicPartition(self.settings.partials_topic, 0, offset)], asynchronous=False)
            self._committed = offset
        except KafkaException as error:
            if error.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("partials offset commit failed (%s); will commit again", error.args[0].str())

    # ---- rebalances (inside consume(), this thread) -----------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions or self.drain.is_set() or self.stop.is_set():
            return  # this processor is leaving: another member merges
        state = MergeState(
            self.settings.window_seconds,
            self.settings.top_ips,
            self.settings.max_distinct_per_window,
            self.settings.max_profiles_per_window,
        )
        published_until = self._published_until()
        if published_until:
            state.restore_published_until(published_until)
        self._in_flight.clear()
        self._delivered.clear()
        self._committed = None
        with self._lock:
            self._state = state
        log.info(
            "this processor is now the merger (windows up to %s already published)",
            iso_utc(published_until) if published_until else "none",
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._state is not None and not self.failed.is_set():
            self._commit(self._state)
        self._drop("no longer the merger (partials topic revoked)")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop("no longer the merger (session lost)")

    def _drop(self, why: str) -> None:
        if self._state is None:
            return
        with self._lock:
            self._state = None
        self._in_flight.clear()
        log.info(why)
