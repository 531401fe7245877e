"""Settings: environment, `.env` file and command-line flags -> one frozen `Settings`.

This is the only module that reads the environment. Everything else receives a
`Settings` object built once at start-up, so behaviour never depends on when a
module happened to be imported.

Precedence, lowest first: built-in defaults, the `.env` file, the process
environment, command-line flags.

Each script reads only the settings it uses (`add_settings_arguments(parser,
only=...)`, each script naming its own list); the others keep their defaults, whatever
the environment says, so one `.env` can serve every script. `KAFKA_*`
pass-through properties reach every script.

A bad value is a user mistake, not a bug: `load_settings_or_exit` prints exactly
one line naming the setting and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, NamedTuple, NoReturn

from dotenv import dotenv_values

from core.errors import PipelineError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

# librdkafka properties that only a consumer understands. Given as plain
# `KAFKA_...` they are still kept away from producers, which would otherwise log
# a warning about an unknown or inapplicable property at every start.
_CONSUMER_ONLY_PREFIXES = ("group.", "fetch.", "queued.", "enable.partition.eof")
_CONSUMER_ONLY = {
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "auto.offset.reset",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "isolation.level",
    "check.crcs",
    "coordinator.query.interval.ms",
}
# And the mirror image, so consumers do not warn about producer tuning.
_PRODUCER_ONLY_PREFIXES = ("batch.", "queue.buffering.", "transaction")
_PRODUCER_ONLY = {
    "acks",
    "request.required.acks",
    "linger.ms",
    "compression.type",
    "compression.codec",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "retries",
    "message.send.max.retries",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "partitioner",
    "sticky.partitioning.linger.ms",
}
# Our defaults for every consumer's librdkafka settings, under the user's KAFKA_*.
CONSUMER_DEFAULTS = {
    # How long a silent group member keeps its partitions, and so how fast a dead
    # processor's partitions move to the others. librdkafka's default is 45 s. On
    # the embedded broker (Tansu) a member also waits about half of it before it
    # joins, so 45 s made the processor of the three-terminal flow take 24 s to its
    # first window; 10 s takes about 6 s. 10 s (Apache Kafka's own default before
    # 3.0) is above the 6 s brokers accept at least (group.min.session.timeout.ms)
    # and leaves room for three heartbeats (heartbeat.interval.ms, 3 s). Override
    # with KAFKA_SESSION_TIMEOUT_MS or KAFKA_CONSUMER_SESSION_TIMEOUT_MS.
    "session.timeout.ms": "10000",
}
# What librdkafka refuses in a consumer of the KIP-848 group protocol
# (`group.protocol=consumer`): the broker sets the session and the heartbeat
# (group.consumer.session.timeout.ms, group.consumer.heartbeat.interval.ms) and
# assigns partitions itself (`group.remote.assignor` names its assignor). Left out of
# every consumer in that mode, our own session default included, and said so in the
# settings line: a consumer given one is never created ("not supported for
# `group.protocol=consumer`"), so every processor of such a group would exit 2.
KIP848_LEFT_OUT = (
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
)
# Fragments of property names whose values must never be printed.
_SECRET_MARKERS = ("password", "secret", "token", "key", "credentials", "jaas")


class ConfigError(PipelineError):
    """A setting has a value we cannot use. `setting` names it the way the user wrote it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


def _positive_int(setting: str, raw: str) -> int:
    value = _int(setting, raw)
    if value <= 0:
        raise ConfigError(setting, f"must be a whole number above 0, got {raw!r}")
    return value


def _non_negative_int(setting: str, raw: str) -> int:
    value = _int(setting, raw)
    if value < 0:
        raise ConfigError(setting, f"must be a whole number of 0 or more, got {raw!r}")
    return value


def _port(setting: str, raw: str) -> int:
    value = _int(setting, raw)
    if not 0 <= value <= 65535:
        raise ConfigError(setting, f"must be a port number from 0 (off) to 65535, got {raw!r}")
    return value


def _int(setting: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(setting, f"must be a whole number, got {raw!r}") from None


def _positive_float(setting: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(setting, f"must be a number of seconds, got {raw!r}") from None
    if not 0 < value < 3600:
        raise ConfigError(setting, f"must be above 0 and below 3600 seconds, got {raw!r}")
    return value


def _choice(choices: Sequence[str]):
    def parse(setting: str, raw: str) -> str:
        value = raw.strip().upper() if choices is LOG_LEVELS else raw.strip().lower()
        if value not in choices:
            raise ConfigError(setting, f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _replication_factor(setting: str, raw: str) -> int:
    value = _int(setting, raw)
    if value == 0 or value < -1:
        raise ConfigError(setting, f"must be -1 (the broker's default) or a whole number above 0, got {raw!r}")
    return value


def utc_time(setting: str, raw: str) -> int:
    """An ISO 8601 time with its zone (`2026-12-01T00:00:00Z`) or epoch seconds -> epoch
    seconds; empty means off (0). A time without a zone is refused: UTC or local?"""
    text = raw.strip()
    if not text:
        return 0
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(
            setting, f"must be a time like 2026-12-01T00:00:00Z (or epoch seconds), got {raw!r}"
        ) from None
    if moment.tzinfo is None:
        raise ConfigError(setting, f"must say its time zone (2026-12-01T00:00:00Z for UTC), got {raw!r}")
    return int(moment.timestamp())


def _non_empty(setting: str, raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ConfigError(setting, f"must not be empty, got {raw!r}")
    return value


class Declared(NamedTuple):
    """One setting as declared on its `Settings` field: everything about it, once."""

    field_name: str
    parse: Callable[[str, str], object]  # (name the user wrote, raw text) -> value, or ConfigError
    help: str
    shaping: bool  # changes what a window's value is: every member of a group must agree
    flag: str | None  # a short flag shown first (`--from`), beside the one named after it
    shown_default: str | None  # how --help shows a default derived from another setting


def setting(
    env_name: str,
    default: object,
    parse: Callable[[str, str], object],
    help: str,
    *,
    shaping: bool = False,
    flag: str | None = None,
    shown_default: str | None = None,
) -> Any:
    """A `Settings` field declared with its environment name, parser and help: the flag
    table, `--help`, the README's table and the window-shaping list are derived from it."""
    return field(
        default=default,
        metadata={"setting": (env_name, parse, help, shaping, flag, shown_default)},
    )


@dataclass(frozen=True)
class Settings:
    """Every knob of the pipeline, validated. Defaults work with the local stack."""

    bootstrap_servers: str = setting(
        "KAFKA_BOOTSTRAP_SERVERS",
        "localhost:29092",
        _non_empty,
        "Kafka brokers, host:port[,host:port]",
        flag="--bootstrap-servers",
    )
    input_topic: str = setting("INPUT_TOPIC", "user-login", _non_empty, "topic of login events")
    output_topic: str = setting("OUTPUT_TOPIC", "device-login-aggregates", _non_empty, "topic of window aggregates")
    # Internal: per-partition parts of windows, merged by one processor (see merging/merge.py).
    # Named after the group when not set (`<CONSUMER_GROUP_ID>-partials`), as Kafka
    # Streams names internal topics after application.id: a pipeline's own by default.
    partials_topic: str = setting(
        "PARTIALS_TOPIC",
        "",
        _non_empty,
        "internal topic of per-partition window parts, merged by one processor of the group",
        shown_default="<CONSUMER_GROUP_ID>-partials",
    )
    dlq_topic: str = setting("DLQ_TOPIC", "user-login-dlq", _non_empty, "dead-letter topic for invalid records")
    consumer_group_id: str = setting(
        "CONSUMER_GROUP_ID", "login-aggregator", _non_empty, "consumer group of the processor"
    )
    # This processor's name in its log lines, with its process id: "processor-2[4711]".
    processor_name: str = setting(
        "PROCESSOR_NAME",
        "processor",
        _non_empty,
        "this processor's name in each log line, after the time and level, with its process id;"
        " a line reads '2026-12-01T18:32:00Z INFO processor-2[4711] merger: ...'",
    )
    window_seconds: int = setting("WINDOW_SECONDS", 30, _positive_int, "tumbling window length", shaping=True)
    allowed_lateness_seconds: int = setting(
        "ALLOWED_LATENESS_SECONDS", 5, _non_negative_int, "grace period", shaping=True
    )
    max_event_time_skew_seconds: int = setting(
        "MAX_EVENT_TIME_SKEW_SECONDS",
        300,
        _positive_int,
        "an event time further ahead of its record's Kafka timestamp counts as a missing timestamp"
        " (a Kafka timestamp further ahead of the wall clock counts at the wall clock)",
        shaping=True,
    )
    top_ips: int = setting("TOP_IPS", 10, _positive_int, "entries in top_ips", shaping=True)
    # A longer string field counts as missing (keeps windows a publishable size).
    max_field_length: int = setting(
        "MAX_FIELD_LENGTH", 256, _positive_int, "longer string values count as missing", shaping=True
    )
    # Distinct device ids / IPs kept per window; past it unique counts are lower bounds.
    max_distinct_per_window: int = setting(
        "MAX_DISTINCT_PER_WINDOW",
        1_000_000,
        _positive_int,
        "device ids / IPs kept per window (memory bound); past it unique counts are lower bounds",
        shaping=True,
    )
    # (device type, app version, locale) combinations kept per window; past it the
    # per-device/locale/version counts are lower bounds (see core/window_value.DEFAULT_MAX_PROFILES).
    max_profiles_per_window: int = setting(
        "MAX_PROFILES_PER_WINDOW",
        10_000,
        _positive_int,
        "(device type, app version, locale) combinations kept per window (memory bound); past it"
        " their counts are lower bounds",
        shaping=True,
    )
    log_level: str = setting("LOG_LEVEL", "INFO", _choice(LOG_LEVELS), "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting(
        "LOG_FORMAT", "text", _choice(LOG_FORMATS), "text (for people) or json (for log shippers)"
    )
    # Partition counts used only when the processor creates missing topics.
    input_partitions: int = setting("INPUT_PARTITIONS", 4, _positive_int, "partitions when creating the input topic")
    # How often the timer thread looks for windows to close.
    close_interval_seconds: float = setting(
        "CLOSE_INTERVAL_SECONDS", 0.5, _positive_float, "how often windows are checked"
    )
    # Records handed over by one consume() call: big enough to amortise the call.
    consume_batch_size: int = setting("CONSUME_BATCH_SIZE", 5000, _positive_int, "records per consume() call")
    # Port of the Prometheus endpoint; 0 turns it off.
    metrics_port: int = setting("METRICS_PORT", 0, _port, "Prometheus endpoint port, 0 = off")
    # A producer with writes unacknowledged this long while the broker is reachable is not
    # ready, and is replaced by a new one (broker/kafka_io.py, RenewableProducer). Well above
    # a broker failover (leader election: seconds), so that only a producer that will never
    # be answered (a restarted broker that forgot its producer id) is replaced.
    ack_timeout_seconds: float = setting(
        "ACK_TIMEOUT_SECONDS",
        60.0,
        _positive_float,
        "a producer whose writes are unacknowledged this long while the broker is reachable is not ready, and is"
        " recreated",
    )
    # The merger's memory bound while windows wait on a stuck member: past it, parts of
    # later windows are read again once the held ones are published (merging/merge.py).
    merge_max_pending_windows: int = setting(
        "MERGE_MAX_PENDING_WINDOWS",
        64,
        _positive_int,
        "windows the merger holds while one waits on a stuck member; later ones are read again after",
    )
    merge_max_pending_mb: int = setting(
        "MERGE_MAX_PENDING_MB",
        512,
        _positive_int,
        "megabytes of parts the merger holds while windows wait on a stuck member",
    )
    # Topics the scripts create when missing: -1 is the broker's own default.replication.factor.
    topic_replication_factor: int = setting(
        "TOPIC_REPLICATION_FACTOR",
        -1,
        _replication_factor,
        "replication factor of the topics a script creates when missing; -1 = the broker's default",
    )
    # min.insync.replicas of the created topics; 0 leaves the broker's default.
    topic_min_insync_replicas: int = setting(
        "TOPIC_MIN_INSYNC_REPLICAS",
        0,
        _non_negative_int,
        "min.insync.replicas of the topics a script creates; 0 = the broker's default",
    )
    # retention.ms of the created DLQ (long enough for someone to look) and partials
    # topic (an unfinished window and a hand-over need minutes; a day is plenty).
    dlq_retention_days: int = setting(
        "DLQ_RETENTION_DAYS", 14, _positive_int, "retention of the DLQ topic when the processor creates it"
    )
    partials_retention_hours: int = setting(
        "PARTIALS_RETENTION_HOURS",
        24,
        _positive_int,
        "retention of the partials topic when the processor creates it (must outlast the longest merge stall)",
    )
    # Recomputation (docs/operations.md, "Recovery"): a new group starts each partition at
    # this time (epoch seconds, 0 = off) less the margin, windows before it count as published.
    recompute_from: int = setting(
        "RECOMPUTE_FROM",
        0,
        utc_time,
        "recompute windows from this time (2026-12-01T00:00:00Z), under a new CONSUMER_GROUP_ID: partitions without"
        " a committed offset start at this time less RECOMPUTE_MARGIN_SECONDS; 0 = off",
        flag="--from",
    )
    recompute_margin_seconds: int = setting(
        "RECOMPUTE_MARGIN_SECONDS",
        600,
        _non_negative_int,
        "with RECOMPUTE_FROM: start reading this much earlier, for records whose Kafka time is behind their event time",
    )
    # Pass-through librdkafka properties (already lower-cased and dotted).
    kafka_common: Mapping[str, str] = field(default_factory=dict)
    kafka_consumer: Mapping[str, str] = field(default_factory=dict)
    kafka_producer: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.partials_topic:
            object.__setattr__(self, "partials_topic", f"{self.consumer_group_id}-partials")

    @property
    def merge_max_pending_bytes(self) -> int:
        return self.merge_max_pending_mb * 1024 * 1024

    def window_shaping(self) -> dict[str, int]:
        """The settings that shape a window's value, by environment name: every part
        carries them, and a merger never merges parts made under others (merging/merge.py)."""
        return {name: getattr(self, _SETTINGS[name].field_name) for name in WINDOW_SHAPING_SETTINGS}

    def consumer_config(self) -> dict[str, str]:
        """librdkafka settings a consumer should see: common + consumer-only (without
        what the KIP-848 protocol forbids, in that mode: `left_out_for_group_protocol`)."""
        config = {
            "bootstrap.servers": self.bootstrap_servers,
            **CONSUMER_DEFAULTS,
            **self.kafka_common,
            **self.kafka_consumer,
        }
        if self.group_protocol == "consumer":
            config = {name: value for name, value in config.items() if name not in KIP848_LEFT_OUT}
        return config

    @property
    def group_protocol(self) -> str:
        """The consumer group protocol: "classic" (librdkafka's default) or "consumer" (KIP-848)."""
        return str({**self.kafka_common, **self.kafka_consumer}.get("group.protocol", "classic")).strip().lower()

    @property
    def incremental_assignment(self) -> bool:
        """Whether a rebalance hands over only the change (KIP-848: the partitions added,
        the partitions taken away) rather than the whole assignment: a rebalance callback
        that sets start offsets then calls `incremental_assign`, not `assign`."""
        return self.group_protocol == "consumer"

    def left_out_for_group_protocol(self) -> dict[str, str]:
        """The consumer settings `consumer_config` leaves out under the KIP-848 protocol."""
        if self.group_protocol != "consumer":
            return {}
        given = {**CONSUMER_DEFAULTS, **self.kafka_common, **self.kafka_consumer}
        return {name: given[name] for name in sorted(given) if name in KIP848_LEFT_OUT}

    def producer_config(self) -> dict[str, str]:
        """librdkafka settings a producer should see: common + producer-only."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.kafka_common, **self.kafka_producer}

    def admin_config(self) -> dict[str, str]:
        """The admin client only needs how to reach and authenticate to the cluster."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.kafka_common}

    def describe(self) -> str:
        """One log line of the effective settings, with every secret masked."""
        parts = [
            f"bootstrap={self.bootstrap_servers}",
            f"input={self.input_topic}",
            f"output={self.output_topic}",
            f"dlq={self.dlq_topic}",
            f"partials={self.partials_topic}",
            f"group={self.consumer_group_id}",
            f"window={self.window_seconds}s",
            f"lateness={self.allowed_lateness_seconds}s",
            f"skew={self.max_event_time_skew_seconds}s",
            f"top_ips={self.top_ips}",
        ]
        if self.recompute_from:
            start = datetime.fromtimestamp(self.recompute_from, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            parts.append(f"recompute_from={start} margin={self.recompute_margin_seconds}s")
        left_out = self.left_out_for_group_protocol()
        passthrough = {**self.kafka_common, **self.kafka_consumer, **self.kafka_producer}
        passthrough = {k: v for k, v in passthrough.items() if k not in left_out}
        if passthrough:
            shown = ",".join(f"{k}={redact(k, v)}" for k, v in sorted(passthrough.items()))
            parts.append(f"kafka[{shown}]")
        if left_out:
            shown = ", ".join(f"{k}={v}" for k, v in left_out.items())
            parts.append(
                f"group.protocol=consumer left out {shown} (the broker sets the session:"
                " group.consumer.session.timeout.ms)"
            )
        return " ".join(parts)


def redact(name: str, value: str) -> str:
    """Mask values of properties that look secret (passwords, keys, tokens)."""
    lowered = name.lower()
    if any(marker in lowered for marker in _SECRET_MARKERS) and not lowered.endswith(".location"):
        return "***"
    return value


# Every setting by environment name, derived from the declarations above (in field order).
_SETTINGS: dict[str, Declared] = {
    f.metadata["setting"][0]: Declared(f.name, *f.metadata["setting"][1:])
    for f in fields(Settings)
    if "setting" in f.metadata
}

# Settings that change what a window's value is (not only where or how fast it goes).
# Members of one group must agree on them; changing one means stopping the group or a
# new CONSUMER_GROUP_ID (docs/operations.md).
WINDOW_SHAPING_SETTINGS = tuple(name for name, declared in _SETTINGS.items() if declared.shaping)


def shown_default(env_name: str, default: object) -> str:
    """A setting's default as --help and the README show it."""
    return _SETTINGS[env_name].shown_default or str(default)


def _flag(env_name: str) -> str:
    return "--" + env_name.lower().replace("_", "-")


def _flags(env_name: str) -> list[str]:
    """A setting's flags, the one to show first (`--bootstrap-servers` is the short one)."""
    short = _SETTINGS[env_name].flag
    return [short, _flag(env_name)] if short else [_flag(env_name)]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error; the contract wants one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


SETTINGS_EPILOG = """\
Each setting above can also be given as its environment variable ("env NAME")
or as NAME=VALUE in the --env-file: flags win, then the environment, then the file.

Any other KAFKA_* variable is passed to the Kafka clients (librdkafka) as a
property, its name lower-cased with "_" as ".":
  KAFKA_SECURITY_PROTOCOL=SASL_SSL  ->  security.protocol=SASL_SSL
  KAFKA_SESSION_TIMEOUT_MS=20000    ->  session.timeout.ms=20000
Consumer-only properties (session.timeout.ms, group.*, fetch.*, auto.offset.reset,
...) reach only consumers, producer tuning (linger.ms, acks, batch.*, ...) only
producers; KAFKA_CONSUMER_<NAME> / KAFKA_PRODUCER_<NAME> reach one kind of
client only. Consumers default to session.timeout.ms={session_timeout}.
--help never shows the values of KAFKA_* variables; logs mask secrets."""


def add_settings_arguments(parser: argparse.ArgumentParser, only: Iterable[str] | None = None) -> None:
    """Add one flag per setting (e.g. `--window-seconds`) plus `--env-file`.

    `only`: the environment names of the settings this script uses (default: all).
    `load_settings_or_exit` reads exactly the settings added here.
    """
    names = list(_SETTINGS) if only is None else list(only)
    unknown = [name for name in names if name not in _SETTINGS]
    if unknown:
        raise ValueError(f"no such setting: {', '.join(unknown)}")
    defaults = {f.name: f.default for f in fields(Settings)}
    group = parser.add_argument_group("settings (flags override environment and .env)")
    for env_name in names:
        field_name, _, help_text, *_ = _SETTINGS[env_name]
        text = f"{help_text} (default: {shown_default(env_name, defaults[field_name])}; env {env_name})"
        group.add_argument(*_flags(env_name), dest=env_name, metavar="VALUE", help=text.replace("%", "%%"))
    group.add_argument("--env-file", default=".env", help="file of KEY=VALUE settings (default: .env)")
    if parser.epilog is None:
        parser.epilog = SETTINGS_EPILOG.format(session_timeout=CONSUMER_DEFAULTS["session.timeout.ms"])
        if parser.formatter_class is argparse.HelpFormatter:  # keep the epilog's lines and examples
            parser.formatter_class = argparse.RawDescriptionHelpFormatter


def build_settings(
    environ: Mapping[str, str],
    flags: Mapping[str, str | None] | None = None,
    only: Iterable[str] | None = None,
) -> Settings:
    """Validate raw settings into `Settings`. Raises ConfigError naming the first bad one.

    `only`: read just these settings (environment names); the rest keep their defaults.
    """
    flags = flags or {}
    wanted = _SETTINGS if only is None else set(only)
    values: dict[str, object] = {}
    for env_name, (field_name, parse, *_) in _SETTINGS.items():
        if env_name not in wanted:
            continue
        flag_value = flags.get(env_name)
        if flag_value is not None:
            values[field_name] = parse(_flags(env_name)[0], flag_value)
        elif env_name in environ:
            values[field_name] = parse(env_name, environ[env_name])
    common, consumer, producer = _kafka_passthrough(environ)
    settings = Settings(**values, kafka_common=common, kafka_consumer=consumer, kafka_producer=producer)
    if settings.group_protocol != "consumer":  # there the strategy is left out (KIP848_LEFT_OUT)
        _refuse_cooperative_assignment(consumer, environ)
    return settings


def _refuse_cooperative_assignment(consumer: Mapping[str, str], environ: Mapping[str, str]) -> None:
    """The incremental (cooperative) rebalance protocol is refused at start: with it,
    confluent-kafka aborted a processor stopping on SIGTERM (an assertion in its
    rebalance callback state, exit -6), so the group's windows cannot be promised.
    The eager assignors (range, the default, and roundrobin) are what is tested."""
    strategy = consumer.get("partition.assignment.strategy", "")
    if "cooperative" in strategy.lower():
        raise ConfigError(
            env_name_of("partition.assignment.strategy", environ),
            f"{strategy!r} is not supported (the cooperative protocol); use range (the default) or roundrobin",
        )


def _kafka_passthrough(environ: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    common: dict[str, str] = {}
    consumer: dict[str, str] = {}
    producer: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith("KAFKA_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            continue
        if name.startswith("KAFKA_CONSUMER_"):
            consumer[_librdkafka_name(name, "KAFKA_CONSUMER_")] = value
        elif name.startswith("KAFKA_PRODUCER_"):
            producer[_librdkafka_name(name, "KAFKA_PRODUCER_")] = value
        else:
            prop = _librdkafka_name(name, "KAFKA_")
            if prop in _CONSUMER_ONLY or prop.startswith(_CONSUMER_ONLY_PREFIXES):
                consumer[prop] = value
            elif prop in _PRODUCER_ONLY or prop.startswith(_PRODUCER_ONLY_PREFIXES):
                producer[prop] = value
            else:
                common[prop] = value
    return common, consumer, producer


def _librdkafka_name(env_name: str, prefix: str) -> str:
    return env_name[len(prefix) :].lower().replace("_", ".")


def env_name_of(librdkafka_property: str, environ: Mapping[str, str]) -> str:
    """The environment name the user wrote for a property, for error messages."""
    for name in environ:
        if name.startswith("KAFKA_"):
            for prefix in ("KAFKA_CONSUMER_", "KAFKA_PRODUCER_", "KAFKA_"):
                if name.startswith(prefix) and _librdkafka_name(name, prefix) == librdkafka_property:
                    return name
    return librdkafka_property


def read_environment(env_file: str, process_environ: Mapping[str, str]) -> dict[str, str]:
    """The `.env` file under the process environment (a variable that is set wins)."""
    merged: dict[str, str] = {}
    if env_file and os.path.isfile(env_file):
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(process_environ)
    return merged


def load_settings_or_exit(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[Settings, argparse.Namespace, dict[str, str]]:
    """Parse flags, `.env` and the environment; on any mistake print one line and exit 2.

    Returns the settings, the parsed flags (for the script's own options) and the
    merged environment (to name `KAFKA_*` settings in later client errors).
    """
    args = parser.parse_args(argv)
    environ = read_environment(args.env_file, os.environ)
    registered = [env_name for env_name in _SETTINGS if hasattr(args, env_name)]  # see add_settings_arguments
    flags = {env_name: getattr(args, env_name) for env_name in registered}
    try:
        return build_settings(environ, flags, only=registered), args, environ
    except ConfigError as error:
        exit_with_config_error(parser.prog, error)


def exit_with_config_error(prog: str, error: ConfigError) -> NoReturn:
    print(f"{prog}: bad setting {error.setting}: {error.problem}", file=sys.stderr)
    raise SystemExit(2)
