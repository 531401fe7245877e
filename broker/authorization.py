"""What each program may need to do on a cluster with an authorizer, and the check that it can.

On Apache Kafka with an authorizer (`StandardAuthorizer`, `allow.everyone.if.no.acl.found=false`)
every request is checked against the ACLs of the client's principal, and a missing ACL
rarely says so where it bites. Seen on Kafka 4.4 (tests/test_least_privilege.py):

- a topic the client may not Describe is absent from the metadata: the processor and the
  generator try to create it (a traceback), the DLQ export finds no DLQ and exports nothing,
  the replay finds no ledger and would replay again what was replayed, the monitor waits
  for its output topic for ever;
- a fetch refused, a group lookup refused: one warning, then the processor waits for ever,
  healthy-looking; a write refused: retried for ever, a line every two seconds.

So every program names what it needs (`processor`, `monitor`, `generator`, and one list
per `ops` tool below), and checks at start-up that the cluster grants it. Whatever is
missing is said in one line naming each operation and resource (`NotAuthorized`, exit
status 2). The processor asks again every `WATCH_SECONDS` while it runs
(`PermissionWatch`): an ACL removed under it stops it the same way, committing nothing more.

How: Kafka answers DescribeTopics and DescribeGroups with the operations the caller may
perform on each resource (KIP-430, `include_authorized_operations`), implied ones included
(Read and Write imply Describe); a resource it may not even Describe is refused outright,
whether it exists or not. A broker that does not answer the question (the embedded broker)
answers nothing: nothing is checked there. Kafka without an authorizer allows everything.
A transactional id has no such question: its Write is checked where the transaction starts.

Not listed, because they are needed only sometimes: Create on a topic, for a program that
creates it when it is missing (`CreateTopics` refused names the topic: `ensure_topics`);
AlterConfigs on the partials topic, for a processor that finds it stamped with CreateTime
(pipeline_topics.py). Not needed at all since Kafka 3.0 (KIP-679): IdempotentWrite on the
cluster (an idempotent producer needs Write on any one topic).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AclOperation, AdminClient

from config import Settings
from core.errors import PipelineError

log = logging.getLogger("kafka")

# The group ids of readers that assign partitions themselves and never commit: a random
# id under a fixed prefix each. Such a consumer still looks up its group's coordinator
# (librdkafka does, for any group id), which needs Describe on the group; a prefixed ACL
# covers every such reader. Without it a reader either fails (the tail reader, the time
# search) or the broker logs a denial at every start (the follower, the monitor).
TAIL_READER_GROUP_PREFIX = "tail-reader-"  # broker/kafka_io.read_topic_tail: the last records of a topic
OUTPUT_FOLLOWER_GROUP_PREFIX = "output-follower-"  # broker/pipeline_topics.PublishedFollower
TIME_SEARCH_GROUP_PREFIX = "time-search-"  # broker/kafka_io.offsets_at_time (RECOMPUTE_FROM)
MONITOR_GROUP_PREFIX = "monitor-"  # monitor_aggregated_data.WindowTail
RECOMPUTE_READER_GROUP_PREFIX = "recompute-reader-"  # ops/recompute.records_since

# How often the processor asks again while it runs: an ACL removed under it is noticed
# within this, instead of its writes or reads being retried for ever.
WATCH_SECONDS = 10.0
_TIMEOUT_SECONDS = 10.0

# librdkafka's codes for "the authorizer said no".
AUTHORIZATION_ERRORS = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)

# Operation names as kafka-acls.sh spells them.
_OPERATIONS = {
    "Read": AclOperation.READ,
    "Write": AclOperation.WRITE,
    "Create": AclOperation.CREATE,
    "Delete": AclOperation.DELETE,
    "Describe": AclOperation.DESCRIBE,
    "DescribeConfigs": AclOperation.DESCRIBE_CONFIGS,
    "AlterConfigs": AclOperation.ALTER_CONFIGS,
}
TOPIC, GROUP, TRANSACTIONAL_ID = "topic", "group", "transactional-id"


@dataclass(frozen=True, order=True)
class Permission:
    """One operation on one resource (or on every resource whose name starts with `name`,
    when `prefixed`): one ACL, as `kafka-acls.sh --add --operation ...` grants it."""

    resource: str  # TOPIC, GROUP or TRANSACTIONAL_ID
    name: str
    operation: str  # a key of _OPERATIONS
    prefixed: bool = False

    def __post_init__(self) -> None:
        if self.operation not in _OPERATIONS or self.resource not in (TOPIC, GROUP, TRANSACTIONAL_ID):
            raise ValueError(f"not a permission: {self.operation} on {self.resource}")

    @property
    def acl_operation(self) -> AclOperation:
        return _OPERATIONS[self.operation]

    def __str__(self) -> str:
        if self.prefixed:
            return f"{self.operation} on {self.resource}s prefixed {self.name}"
        return f"{self.operation} on {self.resource} {self.name}"


class NotAuthorized(PipelineError):
    """The cluster's ACLs do not let this client do what it must. Not retried: an ACL
    does not appear by waiting, and a program that retries looks merely slow."""

    def __init__(self, missing: Sequence[Permission], settings: Settings) -> None:
        self.missing = sorted(set(missing))
        user = settings.kafka_common.get("sasl.username")
        self.principal = f"User:{user}" if user else "this client's principal"
        super().__init__(self.line())

    def line(self) -> str:
        """One line naming every operation and resource the ACLs lack."""
        what = ", ".join(map(str, self.missing))
        return (
            f"not authorized: {what} (for {self.principal}): the cluster has no ACL allowing it;"
            ' see docs/operations.md, "Least privilege on Kafka"'
        )


def is_authorization_error(error: KafkaError | None) -> bool:
    return error is not None and error.code() in AUTHORIZATION_ERRORS


def create_refused(settings: Settings, topics: Iterable[str]) -> NotAuthorized:
    """CreateTopics refused: the topics are missing and this client may not create them (or
    they exist and this client may not even Describe them: Kafka answers the same, so as
    not to tell who may not know that they exist)."""
    return NotAuthorized([Permission(TOPIC, topic, "Create") for topic in topics], settings)


# ---- what each program needs ------------------------------------------------------------


def _topic(name: str, *operations: str) -> list[Permission]:
    return [Permission(TOPIC, name, operation) for operation in operations]


def _group(name: str, operation: str, prefixed: bool = False) -> Permission:
    return Permission(GROUP, name, operation, prefixed)


def processor(settings: Settings) -> list[Permission]:
    """kafka_processor.py, the pipeline's topics and groups already made."""
    s = settings
    needs = [
        *_topic(s.input_topic, "Read"),
        # Windows are written, and read back: where a restart resumes, which windows the
        # group has published (the follower), what settings it uses.
        *_topic(s.output_topic, "Read", "Write"),
        *_topic(s.dlq_topic, "Write"),
        # Its stamping (LogAppendTime: the broker's clock) is checked at start-up.
        *_topic(s.partials_topic, "Read", "Write", "DescribeConfigs"),
        _group(s.consumer_group_id, "Read"),
        _group(f"{s.consumer_group_id}-merge", "Read"),  # merging/merger.merge_group_id
        _group(TAIL_READER_GROUP_PREFIX, "Describe", prefixed=True),
        _group(OUTPUT_FOLLOWER_GROUP_PREFIX, "Describe", prefixed=True),
    ]
    if s.recompute_from:  # a recomputation looks up where each input partition reaches the time
        needs.append(_group(TIME_SEARCH_GROUP_PREFIX, "Describe", prefixed=True))
    return needs


def monitor(settings: Settings, from_beginning: bool = False) -> list[Permission]:
    """monitor_aggregated_data.py: it reads the output and writes nowhere."""
    needs = [*_topic(settings.output_topic, "Read"), _group(MONITOR_GROUP_PREFIX, "Describe", prefixed=True)]
    if not from_beginning:  # it starts at the newest window: read from the end of the topic
        needs.append(_group(TAIL_READER_GROUP_PREFIX, "Describe", prefixed=True))
    return needs


def generator(settings: Settings) -> list[Permission]:
    """data_generator.py (and any producer of the input)."""
    return _topic(settings.input_topic, "Write")


def dlq_replay(settings: Settings, command: str, dry_run: bool = False) -> list[Permission]:
    """python -m ops.dlq_replay `command` (export, replay or discard)."""
    ledger = f"{settings.dlq_topic}-replayed"  # ops/dlq_replay.ledger_topic
    needs = [*_topic(ledger, "Read"), _group(TAIL_READER_GROUP_PREFIX, "Describe", prefixed=True)]
    if command == "export":
        return [*needs, *_topic(settings.dlq_topic, "Read")]
    if command == "replay":
        # Where each record will be counted: the input's partitions (Write implies
        # Describe), this pipeline's newest window.
        needs += [
            *_topic(settings.input_topic, "Describe" if dry_run else "Write"),
            *_topic(settings.output_topic, "Read"),
        ]
        if not dry_run:
            needs += _topic(ledger, "Write")
    elif not dry_run:  # discard
        needs += _topic(ledger, "Write")
    if not dry_run:
        needs.append(Permission(TRANSACTIONAL_ID, dlq_replay_transactional_id(settings), "Write"))
    return needs


def dlq_replay_transactional_id(settings: Settings) -> str:
    """One per DLQ: a run fences every earlier run of the replay of the same DLQ."""
    return f"dlq-replay-{settings.dlq_topic}"


def recompute(settings: Settings, source: str, dry_run: bool = False) -> list[Permission]:
    """python -m ops.recompute --source `source`: staged windows read, copied onto the output."""
    return [
        *_topic(source, "Read"),
        *_topic(settings.output_topic, "Read", *(() if dry_run else ("Write",))),
        _group(TAIL_READER_GROUP_PREFIX, "Describe", prefixed=True),
        _group(RECOMPUTE_READER_GROUP_PREFIX, "Describe", prefixed=True),
    ]


def recompute_cleanup(group: str, topics: Iterable[str], dry_run: bool = False) -> list[Permission]:
    """python -m ops.recompute_cleanup --group `group` --topic ...: a recomputation's topics
    (read first: whose records they hold) and its groups deleted."""
    needs = [_group(TAIL_READER_GROUP_PREFIX, "Describe", prefixed=True)]
    for topic in topics:
        needs += _topic(topic, "Read", *(() if dry_run else ("Delete",)))
    for name in (group, f"{group}-merge"):  # described first (members left?); Delete implies Describe
        needs.append(_group(name, "Describe" if dry_run else "Delete"))
    return needs


# ---- asking the cluster ---------------------------------------------------------------------


# What a describe answered about one resource, besides the operations allowed:
UNKNOWN = "unknown"  # no answer, or no such topic: not this check's to judge
NOT_TOLD = "not told"  # an answer without authorized operations: a broker that does not say
# The name a prefixed group permission is asked about: any name under the prefix is judged
# by the same ACLs.
_PREFIX_PROBE = "permission-check"


def _asked_name(permission: Permission) -> str:
    return permission.name + _PREFIX_PROBE if permission.prefixed else permission.name


def _allowed(future, refused_code: int) -> set[str] | str:
    """The operations a describe future says are allowed (an empty set: refused outright),
    or UNKNOWN, or NOT_TOLD."""
    try:
        answer = future.result()
    except KafkaException as error:
        code = error.args[0].code() if error.args and isinstance(error.args[0], KafkaError) else None
        if code == refused_code:
            return set()
        log.debug("permission check: %s", error)
        return UNKNOWN
    operations = answer.authorized_operations
    if not operations:
        return NOT_TOLD
    return {name for name, operation in _OPERATIONS.items() if operation in operations}


def missing_permissions(admin: AdminClient, needed: Sequence[Permission]) -> list[Permission] | None:
    """What of `needed` the cluster does not grant this client; None if it does not tell
    (a broker that answers without authorized operations). Transactional ids, and topics
    that do not exist, are not asked about."""
    topics = sorted({p.name for p in needed if p.resource == TOPIC})
    groups = sorted({_asked_name(p) for p in needed if p.resource == GROUP})
    allowed: dict[tuple[str, str], set[str] | str] = {}
    if topics:
        answers = admin.describe_topics(
            TopicCollection(topics), request_timeout=_TIMEOUT_SECONDS, include_authorized_operations=True
        )
        for name, future in answers.items():
            allowed[(TOPIC, name)] = _allowed(future, KafkaError.TOPIC_AUTHORIZATION_FAILED)
    if groups:
        answers = admin.describe_consumer_groups(
            groups, request_timeout=_TIMEOUT_SECONDS, include_authorized_operations=True
        )
        for name, future in answers.items():
            allowed[(GROUP, name)] = _allowed(future, KafkaError.GROUP_AUTHORIZATION_FAILED)
    if NOT_TOLD in allowed.values():
        return None
    missing = []
    for permission in needed:
        answer = allowed.get((permission.resource, _asked_name(permission)), UNKNOWN)
        if answer != UNKNOWN and permission.operation not in answer:
            missing.append(permission)
    return missing


def check_permissions(settings: Settings, needed: Sequence[Permission], admin: AdminClient | None = None) -> None:
    """Raise NotAuthorized naming what of `needed` the cluster does not grant this client
    (`admin`: a client of the caller's, else one made from `settings`). Call once the
    broker has answered: a broker that does not answer the question passes."""
    if admin is None:
        admin = AdminClient({"log_level": 2, **settings.admin_config()})
    missing = missing_permissions(admin, needed)
    if missing:
        raise NotAuthorized(missing, settings)


class PermissionWatch:
    """Asks the cluster every `every` seconds, in a thread of its own, whether this client
    still has `needed`; the first time it has not, `refusal` is set (and stays set) and the
    watch ends. The owner's loop reads `refusal` and stops: an ACL removed under a running
    processor is a stop, not writes or reads retried for ever.

    It asks only while the cluster is steady (`steady`: no broker down, none back in the
    last minute). The group part of the question goes to the group coordinator, and
    librdkafka 2.16 can abort the whole process when a connection drops under such a
    request (librdkafka issue #4605: `rd_kafka_enq_once_del_source_return: Assertion
    'eonce->refcnt > 0'`), seen here right after a broker came back. Not asking then
    narrows that window to a connection lost mid-request; an ACL removed during an
    outage is still found a minute after it."""

    def __init__(
        self,
        settings: Settings,
        needed: Sequence[Permission],
        admin_factory: Callable[[], AdminClient],
        every: float = WATCH_SECONDS,
        steady: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.needed = list(needed)
        self._admin_factory = admin_factory
        self.every = every
        self._steady = steady
        self.refusal: NotAuthorized | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="permission-watch", daemon=True)

    def start(self) -> PermissionWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        admin = self._admin_factory()
        while not self._stop.wait(self.every):
            if not self._steady():
                continue
            try:
                missing = missing_permissions(admin, self.needed)
            except KafkaException as error:  # the broker away: the processor says so elsewhere
                log.debug("permission check: %s", error)
                continue
            if missing is None:
                return  # a broker that does not tell: nothing to watch
            if missing:
                self.refusal = NotAuthorized(missing, self.settings)
                return
