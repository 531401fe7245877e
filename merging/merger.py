"""The merge stage: parts of windows in, the contract's windows out.

Every processor runs one `WindowMerger` thread, a member of a second consumer group
(`CONSUMER_GROUP_ID` + "-merge") over the partials topic, which has one partition:
so Kafka's group protocol makes exactly one member at a time the merger, and moves
the job to another member when that one leaves or dies. Only the merger publishes
to the output topic. The others wait, idle, until Kafka picks them.

What every turn keeps (each has a test that injects the fault at that step):

- A new merger (after a crash or a hand-over) first reads the newest window of its
  pipeline on the output topic, and asks again until it can: it publishes, commits and
  merges nothing before, because "unknown" taken as "nothing published" would publish
  a window again from only its later parts, and a part of a published window from a
  partition added since would be merged into it and forgotten with it (records read
  meanwhile are read again once it knows).
- A window handed to the producer keeps the input partition count it was merged
  with, whenever its acknowledgement comes (merge.MergeState.start_publishing).
- Windows go out one at a time, in order: the next is produced only once the broker
  has acknowledged the one before. A window the broker refuses holds every later one
  (the output's newest window is what a new merger resumes from, so a later window
  must never be there before an earlier one).
- Partials offsets are committed only up to what the published windows no longer
  need (merge.MergeState.committable_offset).
- Records of another pipeline are skipped and counted; parts made under other
  window-shaping settings are not merged (an error names the setting and both values)
  and hold the windows and the commit until the members agree.
- A record of a newer format than this processor reads makes it leave the merge
  group, so that an upgraded member merges; it never exits over it.
- Memory stays bounded while windows wait on a stuck member: past a number of
  windows or bytes, pieces of later windows are skipped and read again (seek) once
  the held windows are published. The merger keeps reading, because the parts that
  unblock the oldest window (a new owner's replay) come at the end of the topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from broker.kafka_io import (
    REAL_CLIENTS,
    BrokerHealth,
    KafkaClients,
    RenewableProducer,
    close_within,
    read_topic_tail,
)
from broker.pipeline_topics import Published, output_headers
from config import Settings
from core.window_value import ClosedWindow, iso_utc
from merging.merge import MergeStall, MergeState, Publishing, Verdict
from merging.parts import BadPartialRecord, PartialRecordError, PartOrigin, UnknownPartFormat, decode_partial

log = logging.getLogger("merger")

# How long one publish attempt waits for the broker's acknowledgement of a window.
_PUBLISH_ATTEMPT_SECONDS = 5.0
# How long one turn may go on publishing due windows before it reads again.
_PUBLISH_TURN_SECONDS = 5.0
# After a refusal, how long before the same window is produced again.
_REFUSED_RETRY_SECONDS = 2.0
# At shutdown: how long the merger goes on reading the last parts of this processor.
_DRAIN_SECONDS = 5.0
# How long the merge may stand still, with newer parts in, before it says what it waits on.
_STALL_SECONDS = 60.0
# How often a new merger asks again for the output's tail when it could not be read.
_TAIL_RETRY_SECONDS = 2.0
# How often the merger commits what it has read when it publishes nothing (replays,
# progress, other pipelines' records), so that a new merger does not read them again.
_IDLE_COMMIT_SECONDS = 5.0
# At most one line per this many seconds about skipped records of one kind.
_SKIP_LOG_SECONDS = 60.0


def merge_group_id(settings: Settings) -> str:
    return f"{settings.consumer_group_id}-merge"


def newest_partials_shaping(settings: Settings, clients: KafkaClients = REAL_CLIENTS) -> dict[str, int] | None:
    """The window-shaping settings of this pipeline's newest record among the last ones on
    the partials topic (None: none says, or the topic cannot be read): what the group
    uses, before any window of it is on the output."""
    try:
        messages = read_topic_tail(settings, settings.partials_topic, 50, clients=clients)
    except KafkaException:
        return None
    ours = pipeline_origin(settings)
    newest: dict[str, int] | None = None
    for message in sorted(messages, key=Message.offset):
        try:
            theirs = decode_partial(message.value()).origin
        except PartialRecordError:
            continue
        if theirs.known and theirs.shaping and (theirs.input_topic, theirs.group) == (ours.input_topic, ours.group):
            newest = dict(theirs.shaping)
    return newest


def pipeline_origin(settings: Settings) -> PartOrigin:
    """This processor's pipeline and window-shaping settings, as parts carry them."""
    return PartOrigin(settings.input_topic, settings.consumer_group_id, settings.window_shaping())


@dataclass(frozen=True, slots=True)
class Delivered:
    """The broker acknowledged the window in flight, at this wall-clock time."""

    at: float


@dataclass(frozen=True, slots=True)
class Refused:
    """The broker refused the window in flight, for this reason (it is produced again)."""

    why: str


class WindowMerger:
    """Owns the merge consumer, the output producer and the `MergeState` (this thread
    only); tells the processor what it published through `on_published`."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer_config: dict,
        producer_config: dict,
        health: BrokerHealth,
        newest_published: Callable[[], Published],
        on_published: Callable[[ClosedWindow, float], None],
        host: str,
        clients: KafkaClients = REAL_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        # `clock` measures waits (monotonic); `wall` is the time stamped on what is
        # published: the broker's time as the processor measures it (broker/broker_clock.py).
        self._wall = wall
        self._newest_published = newest_published
        self._on_published = on_published
        self._host = host.encode()
        self._clock = clock
        self._origin = pipeline_origin(settings)
        self._consumer = clients.consumer(
            {**consumer_config, "group.id": merge_group_id(settings), "error_cb": health.on_error}
        )
        self._producer = RenewableProducer(
            "windows",
            {**producer_config, "error_cb": health.on_error},
            health,
            settings.ack_timeout_seconds,
            clients,
            clock,
        )
        self._state: MergeState | None = None
        self._stall = MergeStall(max(_STALL_SECONDS, 2.0 * settings.window_seconds))
        self._lock = threading.Lock()  # guards _state for metrics readers
        self._tail_asked_at: float | None = None
        # The first partials offset read before the output's tail was known: read again then.
        self._reread_at: int | None = None
        # The window produced and not yet acknowledged (one at a time), and its outcome.
        self._in_flight: ClosedWindow | None = None
        self._outcome: Delivered | Refused | None = None
        self._retry_at = 0.0
        self._committed: int | None = None
        self._committed_at = 0.0
        self.skipped: Counter[str] = Counter()  # partials records skipped, by Verdict value (metrics)
        self._skip_logged_at: dict[str, float] = {}
        self.left_the_merge = False  # met a newer format: an upgraded member merges
        self.stop = threading.Event()  # stop now
        self.drain = threading.Event()  # stop after the parts already written are merged
        self.failed = threading.Event()  # a bug: the processor stops without committing
        self._rejoin = threading.Event()  # leave the merge group and join it again (rejoin)
        self._joined = False  # an assignment came since the group last dropped this member
        self._thread = threading.Thread(target=self._run, name="window-merger", daemon=True)

    # ---- lifecycle ----------------------------------------------------------------

    def subscribe(self) -> None:
        self._consumer.subscribe(
            [self.settings.partials_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def start(self) -> None:
        self.subscribe()
        self._thread.start()

    def rejoin(self) -> None:
        """The partials topic was created again: if this consumer completed a join since
        the group last dropped it, leave the merge group and join it again, on this
        thread's next turn (rebalance calls from another thread can deadlock).
        broker/topic_watch.py, RejoinWhenRecreated, says why."""
        self._rejoin.set()

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

    def pending_windows(self) -> int | None:
        """Windows the merge holds, not yet published (None: not the merger)."""
        with self._lock:
            return None if self._state is None else self._state.pending_windows()

    # ---- the loop -----------------------------------------------------------------

    def _run(self) -> None:
        drain_until, drain_to = None, None
        try:
            while not self.stop.is_set() and not self.left_the_merge:
                if self.drain.is_set() and drain_until is None:
                    drain_until = time.monotonic() + _DRAIN_SECONDS
                    drain_to = self._end_offset()
                self.turn(0.2)
                if drain_until is not None and (
                    time.monotonic() > drain_until or (self._in_flight is None and self._read_to(drain_to))
                ):
                    break
        except Exception:
            log.exception("merger crashed; nothing more is committed")
            self.failed.set()
            self.stop.set()
        finally:
            self._close()

    def turn(self, wait_seconds: float) -> None:
        """One turn: learn what is published (a new merger), read parts, publish what is
        due, commit, and say so if the merge is stuck."""
        if self._rejoin.is_set():
            self._rejoin.clear()
            if self._joined:
                log.info("leaving and joining the merge group again: the partials topic was created again")
                self._joined = False
                self._consumer.unsubscribe()
                self.subscribe()
        self._learn_published()
        messages = self._consumer.consume(1000, wait_seconds)
        state = self._state
        if state is not None and not state.knows_published_until:
            messages = self._put_back(messages)
        for message in messages:
            self._add(message)
            if self.left_the_merge:
                return
        self._publish_due()
        self._reread_if_due()
        self._warn_if_stalled()

    def _put_back(self, messages: list[Message]) -> list[Message]:
        """Records read before this new merger knows what the output holds are not merged
        yet: a part of a published window from a partition added since must count as
        late, and only the output's tail tells which windows are published. They are
        read again (seek) once it is known; client errors are kept."""
        offsets = [m.offset() for m in messages if m.error() is None]
        if offsets:
            first = min(offsets)
            self._reread_at = first if self._reread_at is None else min(self._reread_at, first)
        return [m for m in messages if m.error() is not None]

    def _learn_published(self) -> None:
        """A new merger reads its pipeline's newest window on the output topic before it
        publishes or commits anything, asking again while the topic cannot be read."""
        state = self._state
        if state is None or state.knows_published_until:
            return
        now = self._clock()
        if self._tail_asked_at is not None and now - self._tail_asked_at < _TAIL_RETRY_SECONDS:
            return
        self._tail_asked_at = now
        try:
            published = self._newest_published()
        except KafkaException as error:
            self._count_skipped(
                "tail",
                f"cannot read the newest window on {self.settings.output_topic} yet ({error}); merging waits"
                " (nothing published, nothing committed) and asks again",
                level=logging.WARNING,
                metric="",
            )
            return
        with self._lock:
            state.restore_published_until(published.until, published.partition_count, published.accounted)
        if self._reread_at is not None:
            self._consumer.seek(TopicPartition(self.settings.partials_topic, 0, self._reread_at))
            self._reread_at = None
        width = self.settings.window_seconds
        if published.recomputing:
            log.info(
                "this processor is now the merger: recomputing from %s (RECOMPUTE_FROM), it publishes from there on",
                iso_utc(published.until),
            )
        elif published.until:
            log.info(
                "this processor is now the merger: the output holds every window up to the one starting %s;"
                " it publishes from %s on",
                iso_utc(published.until - width),
                iso_utc(published.until),
            )
        else:
            log.info("this processor is now the merger: no window of this pipeline is on the output yet")

    def _warn_if_stalled(self) -> None:
        """Name what the merge waits on when it has stood still for long (`MergeStall`)."""
        state = self._state
        if state is None or not self._stall.due(self._clock(), state.published_until, state.pending_windows()):
            return
        closed = state.closed_until()
        conflicts = {c.partition: c for c in state.conflicts()}
        holding = [
            f"{p} (its parts were made with {conflicts[p].describe()})"
            if p in conflicts
            else f"{p} (closed up to {iso_utc(closed[p])})"
            if p in closed
            else f"{p} (no window closed there yet)"
            for p in state.holding_partitions()
        ]
        incomplete = [
            f"partition {p} of window {iso_utc(start)} ({received} of {pieces} pieces)"
            for start, p, received, pieces in state.incomplete_parts()[:3]
        ]
        log.warning(
            "no window published for %.0fs or more although %d window(s) up to %s wait: waiting for input"
            " partition(s) %s%s; %s",
            self._stall.after_seconds,
            state.pending_windows(),
            iso_utc(state.newest_part_end() or state.published_until),
            ", ".join(holding) or "none",
            "; incomplete: " + ", ".join(incomplete) if incomplete else "",
            "the members of the group must agree on these settings"
            if conflicts
            else "their processor is stuck or far behind",
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

    # ---- reading ------------------------------------------------------------------

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
        except UnknownPartFormat as newer:
            self._leave_the_merge(newer, message.offset())
            return
        except BadPartialRecord as problem:
            self._count_skipped("damaged", f"skipping partials record at offset {message.offset()}: {problem}")
            return
        with self._lock:
            verdict = state.add(record, message.offset(), len(message.value()))
        if verdict is Verdict.OTHER_PIPELINE:
            self._count_skipped(
                verdict.value,
                f"skipping partials records of another pipeline ({record.origin.describe()}) on"
                f" {self.settings.partials_topic}; this one is input {self.settings.input_topic!r},"
                f" group {self.settings.consumer_group_id!r}",
                level=logging.WARNING,
            )
        elif verdict is Verdict.SETTINGS_MISMATCH:
            [conflict] = [c for c in state.conflicts() if c.partition == record.partition]
            self._count_skipped(
                f"{verdict.value}:{conflict.describe()}",
                f"partials records of input partition {record.partition} were made with {conflict.describe()}:"
                " not merged; the windows wait (nothing is committed past them) until every member of group"
                f" {self.settings.consumer_group_id!r} runs with the same settings",
                level=logging.ERROR,
                metric=verdict.value,
            )
        elif verdict is Verdict.BEYOND_BOUND:
            self._count_skipped(verdict.value, self._bound_reached(state), level=logging.WARNING)
        elif verdict in (Verdict.MISALIGNED, Verdict.LATE_PARTITION):
            self.skipped[verdict.value] += 1

    def _count_skipped(self, kind: str, text: str, level: int = logging.ERROR, metric: str | None = None) -> None:
        """Count a skipped record (under `metric`, else `kind`; "" counts nothing); log
        about its kind at most once a minute."""
        if metric != "":
            self.skipped[metric or kind] += 1
        now = self._clock()
        logged_at = self._skip_logged_at.get(kind)
        if logged_at is not None and now - logged_at < _SKIP_LOG_SECONDS:
            return
        self._skip_logged_at[kind] = now
        log.log(level, "%s", text)

    def _bound_reached(self, state: MergeState) -> str:
        closed = state.closed_until()
        waiting = ", ".join(
            f"{p} (closed up to {iso_utc(closed[p])})" if p in closed else f"{p} (nothing closed yet)"
            for p in state.holding_partitions()
        )
        return (
            f"the merge holds {state.pending_windows()} window(s), its bound (MERGE_MAX_PENDING_WINDOWS"
            f" {self.settings.merge_max_pending_windows}, MERGE_MAX_PENDING_MB {self.settings.merge_max_pending_mb}):"
            f" waiting for input partition(s) {waiting or 'none'}; parts of later windows are read again once these"
            " are published"
        )

    def _leave_the_merge(self, newer: UnknownPartFormat, offset: int) -> None:
        """Leave the merge group: Kafka gives the partials topic to another member, an
        upgraded one if there is any. Never exit over it: a crash-looping group merges
        nothing at all. This processor goes on with its input partitions."""
        log.error(
            "partials record at offset %d: %s; leaving the merge to a member that reads it (upgrade this processor)",
            offset,
            newer,
        )
        self.skipped["newer_format"] += 1
        with self._lock:
            self._state = None
        self.left_the_merge = True
        try:
            self._consumer.unsubscribe()
        except (KafkaException, RuntimeError) as error:
            log.warning("could not leave the merge group (%s); it will when the processor stops", error)

    def _reread_if_due(self) -> None:
        """Past the memory bound, skipped pieces are read again once the held windows
        are published."""
        state = self._state
        if state is None:
            return
        with self._lock:
            offset = state.reread_from()
        if offset is None:
            return
        log.info("reading the partials topic again from offset %d (windows were held back by the memory bound)", offset)
        self._consumer.seek(TopicPartition(self.settings.partials_topic, 0, offset))

    # ---- publishing -----------------------------------------------------------------

    def _publish_due(self) -> None:
        """Publish due windows one at a time, in order, each only once the one before it
        is acknowledged; stop at the first that is not (it holds every later one)."""
        state = self._state
        if state is None or not state.knows_published_until:
            return
        deadline = self._clock() + _PUBLISH_TURN_SECONDS
        published = False
        while self._clock() < deadline:
            if self._in_flight is None:
                if self._clock() < self._retry_at:
                    break
                with self._lock:
                    window = state.next_due()
                if window is None:
                    break
                with self._lock:
                    publishing = state.start_publishing(window.start)
                if not self._produce(window, publishing):
                    with self._lock:
                        state.publishing_failed(window.start)
                    break
            self._producer.flush(_PUBLISH_ATTEMPT_SECONDS)
            outcome, self._outcome = self._outcome, None
            window = self._in_flight
            if outcome is None:
                break  # not acknowledged yet: the broker is slow or away; ask again next turn
            self._in_flight = None
            if isinstance(outcome, Refused):
                with self._lock:
                    state.publishing_failed(window.start)
                log.error("window %s was refused (%s); later windows wait for it", iso_utc(window.start), outcome.why)
                self._retry_at = self._clock() + _REFUSED_RETRY_SECONDS
                break
            with self._lock:
                state.mark_published([window.start])
            self._on_published(window, outcome.at)
            published = True
        if published or self._clock() - self._committed_at > _IDLE_COMMIT_SECONDS:
            self._commit(state)

    def _produce(self, window: ClosedWindow, publishing: Publishing) -> bool:
        now = self._wall()
        published_at = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode()
        try:
            self._producer.produce(
                self.settings.output_topic,
                key=window.key,
                value=window.value,
                # The broker's time, not this machine's: a processor whose clock runs an
                # hour ahead would otherwise have its windows refused by Kafka
                # (message.timestamp.after.max.ms) on a CreateTime output topic.
                timestamp=int(now * 1000),
                headers=[
                    ("processor.host", self._host),
                    ("published.at", published_at),
                    *output_headers(self.settings, publishing.partition_count, publishing.accounted),
                ],
                on_delivery=self._report_for(window),
            )
        except (KafkaException, BufferError) as error:
            if not self.stop.is_set():  # else stopping: a fatal client error, said already
                log.error("window %s not queued (%s); trying again", iso_utc(window.start), error)
            return False
        self._in_flight, self._outcome = window, None
        return True

    def _report_for(self, window: ClosedWindow):
        def report(error: KafkaError | None, _message: Message) -> None:
            if self._in_flight is window:  # a report for the window in flight, not an older one
                self._outcome = Delivered(self._wall()) if error is None else Refused(error.str())

        return report

    def _commit(self, state: MergeState) -> None:
        if self.stop.is_set():
            return  # a crash (here or in the processor): nothing more is committed
        with self._lock:
            offset = state.committable_offset()
        self._committed_at = self._clock()
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
        self._joined = True
        if not partitions or self.drain.is_set() or self.stop.is_set() or self.left_the_merge:
            return  # this processor is leaving: another member merges
        s = self.settings
        state = MergeState(
            s.window_seconds,
            s.top_ips,
            s.max_distinct_per_window,
            s.max_profiles_per_window,
            origin=self._origin,
            published_until=None,  # unknown until the output's tail is read (_learn_published)
            max_pending_windows=s.merge_max_pending_windows,
            max_pending_bytes=s.merge_max_pending_bytes,
        )
        self._in_flight, self._outcome, self._committed, self._tail_asked_at = None, None, None, None
        self._reread_at = None
        with self._lock:
            self._state = state  # what is published is learnt on the next turn, not in this callback

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._state is not None and not self.failed.is_set():
            self._commit(self._state)
        self._drop("no longer the merger (partials topic revoked)")

    def _on_lost(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = False
        self._drop("no longer the merger (session lost)")

    def _drop(self, why: str) -> None:
        if self._state is None:
            return
        with self._lock:
            self._state = None
        self._in_flight = None
        log.info(why)
