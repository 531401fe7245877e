"""Remove what a recomputation left behind: its topics and its consumer groups.

The last step of a recomputation (docs/operations.md, "Recompute the windows of a time
range"), through Kafka's admin API, for clusters where `kafka-topics.sh` and
`kafka-consumer-groups.sh` are not at hand (the embedded broker, a managed Kafka):

    python -m ops.recompute_cleanup --group login-recompute-1 \\
        --topic device-login-aggregates-recompute-1 --topic login-recompute-1-partials [--dry-run]

It deletes the named topics, the group and its merge group (`<group>-merge`). Run with
the live processors' settings (their `.env`), so that it knows what it must never
delete: it refuses the live pipeline's topics (input, output, DLQ, partials, the DLQ
replay ledger) and groups by name, and any topic whose records name another pipeline's
group than `--group` (the live output under another name, say): one line naming the
flag, exit 2, nothing deleted. A group that still has members is refused too (where
the broker says so: Apache Kafka does, the embedded broker reports no members).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Sequence

from confluent_kafka import ConsumerGroupState, KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from broker import authorization
from broker.authorization import NotAuthorized, check_permissions
from broker.kafka_io import QUIET_CLIENT_LOGS, AuthenticationFailed, read_topic_tail
from broker.pipeline_topics import PIPELINE_GROUP_HEADER
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
)
from merging.merger import merge_group_id
from merging.parts import PartialRecordError, decode_partial
from telemetry.log_setup import configure_logging

log = logging.getLogger("recompute-cleanup")

PROG = "python -m ops.recompute_cleanup"
# The live pipeline's names: what this tool must never delete.
SETTINGS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "INPUT_TOPIC",
    "OUTPUT_TOPIC",
    "DLQ_TOPIC",
    "PARTIALS_TOPIC",
    "CONSUMER_GROUP_ID",
    "LOG_LEVEL",
    "LOG_FORMAT",
)
# Records read from the end of each partition to learn whose a topic is.
_TAIL_RECORDS = 50
_TIMEOUT_SECONDS = 30.0
# States of a group whose members are still there.
_ACTIVE = {
    ConsumerGroupState.STABLE,
    ConsumerGroupState.PREPARING_REBALANCING,
    ConsumerGroupState.COMPLETING_REBALANCING,
}


def live_topics(settings: Settings) -> dict[str, str]:
    """{topic: what it is to the live pipeline}."""
    return {
        settings.input_topic: "INPUT_TOPIC",
        settings.output_topic: "OUTPUT_TOPIC",
        settings.dlq_topic: "DLQ_TOPIC",
        settings.partials_topic: "PARTIALS_TOPIC",
        f"{settings.dlq_topic}-replayed": "the DLQ replay's ledger",
    }


def groups_of(group: str) -> list[str]:
    """A recomputation's groups: its own and its merge group."""
    return [group, merge_group_id(Settings(consumer_group_id=group))]


def refusal(settings: Settings, group: str, topics: Iterable[str]) -> ConfigError | None:
    """Why the request names something of the live pipeline (by name), or None."""
    live_groups = groups_of(settings.consumer_group_id)
    if group in live_groups:
        return ConfigError("--group", f"{group} is the live pipeline's group (CONSUMER_GROUP_ID or its merge group)")
    live = live_topics(settings)
    for topic in topics:
        if topic in live:
            return ConfigError("--topic", f"{topic} is the live pipeline's {live[topic]}")
    return None


def named_group(message) -> str:
    """The pipeline group a record names ("" where it names none): an output window's
    header, or a partials record's origin."""
    headers = dict(message.headers() or [])
    if PIPELINE_GROUP_HEADER in headers:
        return headers[PIPELINE_GROUP_HEADER].decode("utf-8", "replace")
    try:
        return decode_partial(message.value()).origin.group
    except (PartialRecordError, TypeError):
        return ""


def foreign_groups(settings: Settings, topic: str, group: str) -> set[str]:
    """The other pipelines' groups that the end of `topic` names."""
    records = read_topic_tail(settings, topic, _TAIL_RECORDS, timeout=_TIMEOUT_SECONDS)
    return {name for message in records if (name := named_group(message)) and name != group}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--group", required=True, help="the recomputation's CONSUMER_GROUP_ID (its merge group goes too)"
    )
    parser.add_argument(
        "--topic",
        action="append",
        default=[],
        help="a topic of the recomputation to delete: its staging output, its partials topic (repeat the flag)",
    )
    parser.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    add_settings_arguments(parser, only=SETTINGS)
    return parser


def _delete_topics(admin: AdminClient, topics: list[str]) -> list[str]:
    deleted = []
    for topic, future in admin.delete_topics(topics, operation_timeout=_TIMEOUT_SECONDS).items():
        try:
            future.result()
            deleted.append(topic)
            print(f"deleted topic {topic}")
        except KafkaException as error:
            if error.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            print(f"topic {topic}: not there")
    return deleted


def _delete_groups(admin: AdminClient, groups: list[str]) -> list[str]:
    deleted = []
    for group, future in admin.delete_consumer_groups(groups, request_timeout=_TIMEOUT_SECONDS).items():
        try:
            future.result()
            deleted.append(group)
            print(f"deleted group {group}")
        except KafkaException as error:
            if error.args[0].code() != KafkaError.GROUP_ID_NOT_FOUND:
                raise
            print(f"group {group}: not there")
    return deleted


def _members(admin: AdminClient, groups: list[str]) -> str | None:
    """A group among `groups` that still has members, as words; None if none has."""
    for group, future in admin.describe_consumer_groups(groups, request_timeout=_TIMEOUT_SECONDS).items():
        try:
            description = future.result()
        except KafkaException:
            continue  # not there, or not described: nothing to stop
        if description.members or description.state in _ACTIVE:
            return f"{group} still has {len(description.members)} member(s): stop the recomputation first"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    settings, args, _ = load_settings_or_exit(build_parser(), argv)
    configure_logging(settings.log_level, settings.log_format)
    topics = list(dict.fromkeys(args.topic))
    refused = refusal(settings, args.group, topics)
    if refused is not None:
        exit_with_config_error(PROG, refused)
    groups = groups_of(args.group)
    admin = AdminClient({**QUIET_CLIENT_LOGS, **settings.admin_config()})
    try:
        # A topic it may not see looks absent ("not there"), and would be left undeleted.
        check_permissions(settings, authorization.recompute_cleanup(args.group, topics, args.dry_run), admin)
        existing = set(admin.list_topics(timeout=_TIMEOUT_SECONDS).topics)
        for topic in topics:
            others = foreign_groups(settings, topic, args.group) if topic in existing else set()
            if others:
                exit_with_config_error(
                    PROG,
                    ConfigError(
                        "--topic", f"{topic} holds records of group {', '.join(sorted(others))}, not {args.group}"
                    ),
                )
        busy = _members(admin, groups)
        if busy is not None:
            exit_with_config_error(PROG, ConfigError("--group", busy))
        if args.dry_run:
            for topic in topics:
                print(f"would delete topic {topic}" if topic in existing else f"topic {topic}: not there")
            for group in groups:
                print(f"would delete group {group}")
            return 0
        deleted_topics = _delete_topics(admin, topics) if topics else []
        deleted_groups = _delete_groups(admin, groups)
    except AuthenticationFailed as refused_by_broker:
        exit_with_config_error(PROG, refused_by_broker.as_config_error())
    except NotAuthorized as not_allowed:
        print(f"{PROG}: {not_allowed.line()}", file=sys.stderr)
        return 2
    except KafkaException as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    print(f"deleted {len(deleted_topics)} topic(s) and {len(deleted_groups)} group(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
