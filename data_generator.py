"""Produce login events to `user-login`.

Profiles:
  reference  what the public generator of the original exercise writes: about 2
             events/s, fresh UUID4 user and device ids, app_version "2.3.0", a
             random IPv4, one of the 50 US state codes, `device_type` android/iOS
             (absent in about 5% of events), integer epoch-second timestamps.
  realistic  (default) data whose aggregates mean something: returning devices and
             users, a few heavy-hitter IPs, several app versions per device type,
             weighted locales, a small share of malformed records and of string
             timestamps.

`--backlog-seconds N` spreads the event times of `--count` events evenly over the
last N seconds (a backlog to catch up on); otherwise event time is "now".
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaError, KafkaException, Producer

from broker import authorization
from broker.authorization import TOPIC, NotAuthorized, Permission, is_authorization_error
from broker.kafka_io import (
    QUIET_CLIENT_LOGS,
    AuthenticationFailed,
    BrokerHealth,
    client_setting_error,
    ensure_topics,
)
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    exit_with_config_error,
    load_settings_or_exit,
)
from telemetry.log_setup import configure_logging

# The settings the generator reads and lists in --help. It creates the input topic
# when it is first, hence INPUT_PARTITIONS and the topic settings.
GENERATOR_SETTINGS = (
    "KAFKA_BOOTSTRAP_SERVERS",
    "INPUT_TOPIC",
    "INPUT_PARTITIONS",
    "TOPIC_REPLICATION_FACTOR",
    "TOPIC_MIN_INSYNC_REPLICAS",
    "LOG_LEVEL",
    "LOG_FORMAT",
)

log = logging.getLogger("generator")

# fmt: off
US_STATES = [
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS", "KY",
    "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY", "NC", "ND",
    "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV", "WI", "WY",
]
# fmt: on

EventMaker = Callable[[random.Random, int], bytes]


def _random_ip(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def reference_event(rng: random.Random, timestamp: int) -> bytes:
    """One event shaped like the original exercise's generator."""
    event = {
        "user_id": _uuid(rng),
        "app_version": "2.3.0",
        "device_type": rng.choice(("android", "iOS")),
        "ip": _random_ip(rng),
        "locale": rng.choice(US_STATES),
        "device_id": _uuid(rng),
        "timestamp": timestamp,
    }
    if rng.random() < 0.05:
        del event["device_type"]
    return json.dumps(event).encode()


class RealisticProfile:
    """Returning devices and users, heavy-hitter IPs, weighted locales, some bad data."""

    VERSIONS = {"android": ("2.3.0", "2.2.1", "2.1.4"), "iOS": ("2.3.0", "2.2.0"), "web": ("1.9.3",)}
    VERSION_WEIGHTS = {"android": (6, 3, 1), "iOS": (8, 2), "web": (1,)}

    def __init__(self, rng: random.Random, devices: int = 20_000, heavy_ips: int = 10) -> None:
        self.locales = US_STATES + ["RU", "DE", "IN", "BR", "GB"]
        # A long tail: the first states are much more common than the last ones.
        self.locale_weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(self.locales))]
        self.devices = []
        for _ in range(devices):
            device_type = rng.choices(("android", "iOS", "web"), (55, 40, 5))[0]
            version = rng.choices(self.VERSIONS[device_type], self.VERSION_WEIGHTS[device_type])[0]
            locale = rng.choices(self.locales, self.locale_weights)[0]
            self.devices.append((_uuid(rng), device_type, version, locale, _uuid(rng), _random_ip(rng)))
        self.heavy_ips = [_random_ip(rng) for _ in range(heavy_ips)]

    def event(self, rng: random.Random, timestamp: int) -> bytes:
        roll = rng.random()
        if roll < 0.002:
            return rng.choice((b"{not json", b"[1, 2, 3]", b"\xff\xfe binary", b'"just a string"', b"null"))
        device_id, device_type, version, locale, user_id, home_ip = rng.choice(self.devices)
        ip = rng.choice(self.heavy_ips) if roll < 0.15 else home_ip if roll < 0.8 else _random_ip(rng)
        event: dict[str, object] = {
            "user_id": user_id,
            "app_version": version,
            "device_type": device_type,
            "ip": ip,
            "locale": locale,
            "device_id": device_id,
            "timestamp": timestamp,
        }
        if roll > 0.98:
            event["timestamp"] = str(timestamp)  # some clients send strings
        elif roll > 0.97:
            del event[rng.choice(("device_type", "locale", "app_version", "ip"))]
        return json.dumps(event).encode()


def event_maker(profile: str, rng: random.Random) -> EventMaker:
    if profile == "reference":
        return reference_event
    return RealisticProfile(rng).event


def event_times(
    count: int, backlog_seconds: int, now: float, since: float | None = None, rate: float = 0.0
) -> Callable[[int], int]:
    """Event time of the i-th event: from `since` at `rate` (a stream that carries on
    exactly where another ended), spread over the backlog, or the wall clock."""
    if since is not None:
        return lambda index: int(since + index / rate)
    if backlog_seconds <= 0:
        return lambda _index: int(time.time())
    start = now - backlog_seconds
    step = backlog_seconds / count
    return lambda index: int(start + index * step)


def produce(
    settings: Settings,
    profile: str,
    rate: float,
    count: int,
    backlog_seconds: int,
    seed: int | None,
    stop: threading.Event,
    since: float | None = None,
) -> int:
    """Produce events until `count` (0 = forever) or stop. Returns how many were sent.
    With `since`, event i is stamped `since + i / rate` and sent no earlier than that
    moment: what is already past goes at once, then the clock is kept."""
    rng = random.Random(seed)
    make = event_maker(profile, rng)
    if backlog_seconds > 0 and count <= 0:
        raise ValueError("--backlog-seconds needs --count")
    time_of = event_times(count, backlog_seconds, time.time(), since, rate)
    health = BrokerHealth(settings.bootstrap_servers, log)
    refused: list[KafkaError] = []  # deliveries the cluster's ACLs refused (Write taken away)

    def delivered(error: KafkaError | None, _message) -> None:
        if is_authorization_error(error):
            refused.append(error)

    producer = Producer(
        {
            **QUIET_CLIENT_LOGS,
            "linger.ms": 20,
            # Like the processor's: acknowledged by every in-sync replica, no duplicate from a retry.
            "acks": "all",
            "enable.idempotence": True,
            **settings.producer_config(),
            "error_cb": health.on_error,
            "on_delivery": delivered,
        }
    )
    sent = 0
    started = time.monotonic()
    ahead = 0.0 if since is None else since - time.time()  # < 0: the schedule began in the past
    last_report = started
    while not stop.is_set() and (count <= 0 or sent < count):
        if refused:  # not sent again and again: the ACL does not come back by itself
            raise NotAuthorized([Permission(TOPIC, settings.input_topic, "Write")], settings)
        value = make(rng, time_of(sent))
        try:
            producer.produce(settings.input_topic, value=value)
        except BufferError:
            producer.poll(0.1)
            continue
        sent += 1
        if rate > 0:
            stop.wait(max(0.0, started + ahead + sent / rate - time.monotonic()))
        if rate > 0 or sent % 10_000 == 0:  # paced: serve delivery reports as they come
            producer.poll(0)
        now = time.monotonic()
        if now - last_report >= 10:
            log.info("sent %d events (%.0f/s)", sent, sent / (now - started))
            last_report = now
    producer.flush(30)
    if refused:
        raise NotAuthorized([Permission(TOPIC, settings.input_topic, "Write")], settings)
    log.info("sent %d events in %.1fs", sent, time.monotonic() - started)
    return sent


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="data_generator.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile", choices=("realistic", "reference"), default="realistic", help="kind of data (default: realistic)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events per second, 0 = as fast as possible (default: 50; 2 for reference; 0 with --backlog-seconds)",
    )
    parser.add_argument("--count", type=int, default=0, help="stop after this many events (default: 0 = run forever)")
    parser.add_argument(
        "--backlog-seconds",
        type=int,
        default=0,
        metavar="N",
        help="spread event times over the past N seconds (default: 0 = now)",
    )
    parser.add_argument(
        "--since",
        type=float,
        default=None,
        metavar="EPOCH",
        help="stamp events from this moment (epoch seconds) on at --rate, sending at once what is already past,"
        " so that one run carries on exactly where another ended (default: the clock)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable data (default: random)")
    add_settings_arguments(parser, only=GENERATOR_SETTINGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    settings, args, environ = load_settings_or_exit(parser, argv)
    configure_logging(settings.log_level, settings.log_format)
    if args.count < 0 or (args.rate is not None and args.rate < 0):
        parser.error("--count and --rate must not be negative")
    if args.backlog_seconds > 0 and args.count <= 0:
        parser.error("--backlog-seconds needs --count")
    rate = args.rate if args.rate is not None else (2.0 if args.profile == "reference" else 50.0)
    if args.backlog_seconds > 0 and args.rate is None:
        rate = 0.0
    if args.since is not None and (args.backlog_seconds > 0 or rate <= 0):
        parser.error("--since needs a --rate above 0 and no --backlog-seconds")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    health = BrokerHealth(settings.bootstrap_servers, log)
    try:
        topics = {settings.input_topic: settings.input_partitions}
        if not ensure_topics(settings, topics, stop.is_set, health, permissions=authorization.generator(settings)):
            return health.exit_status_when_stopped()
        produce(settings, args.profile, rate, args.count, args.backlog_seconds, args.seed, stop, args.since)
    except AuthenticationFailed as refused:
        exit_with_config_error("data_generator.py", refused.as_config_error())
    except NotAuthorized as refused:  # the cluster's ACLs (broker/authorization.py)
        print(f"data_generator.py: {refused.line()}", file=sys.stderr)
        return 2
    except ConfigError as error:  # a topic setting the cluster refused
        exit_with_config_error("data_generator.py", error)
    except KafkaException as error:
        if (problem := client_setting_error(error, environ)) is not None:  # e.g. a TLS file it cannot read
            exit_with_config_error("data_generator.py", problem)
        reason = error.args[0].str() if error.args and isinstance(error.args[0], KafkaError) else str(error)
        print(f"data_generator.py: stopped: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
