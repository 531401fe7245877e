"""config: precedence, validation, librdkafka pass-through, and the exit-2 contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import (
    _SETTINGS,
    CONSUMER_DEFAULTS,
    KIP848_LEFT_OUT,
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    build_settings,
    load_settings_or_exit,
    read_environment,
    redact,
    shown_default,
)
from data_generator import GENERATOR_SETTINGS
from local_stack import LOCAL_STACK_SETTINGS
from monitor_aggregated_data import MONITOR_SETTINGS
from testkit.processes import run_script

ROOT = Path(__file__).resolve().parent.parent

ALL_SETTINGS = tuple(_SETTINGS)


def test_defaults_work_with_the_local_stack():
    settings = build_settings({})
    assert settings == Settings()
    assert settings.bootstrap_servers == "localhost:29092"
    assert (settings.input_topic, settings.output_topic, settings.dlq_topic) == (
        "user-login",
        "device-login-aggregates",
        "user-login-dlq",
    )
    assert (settings.window_seconds, settings.allowed_lateness_seconds) == (30, 5)
    assert (settings.max_event_time_skew_seconds, settings.top_ips, settings.log_level) == (300, 10, "INFO")


def test_settings_are_frozen():
    with pytest.raises(AttributeError):
        Settings().window_seconds = 5  # type: ignore[misc]


def test_flags_override_environment_which_overrides_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("WINDOW_SECONDS=10\nTOP_IPS=3\nLOG_LEVEL=debug\n")
    environ = read_environment(str(env_file), {"TOP_IPS": "4"})
    settings = build_settings(environ, {"LOG_LEVEL": "error"})
    assert (settings.window_seconds, settings.top_ips, settings.log_level) == (10, 4, "ERROR")


def test_kafka_settings_pass_through_to_the_right_clients():
    settings = build_settings(
        {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
            "KAFKA_AUTO_OFFSET_RESET": "latest",
            "KAFKA_FETCH_MAX_BYTES": "1000000",
            "KAFKA_LINGER_MS": "50",
            "KAFKA_CONSUMER_CLIENT_ID": "c",
            "KAFKA_PRODUCER_CLIENT_ID": "p",
            "KAFKA_BOOTSTRAP_SERVERS": "b:9092",
        }
    )
    consumer, producer, admin = settings.consumer_config(), settings.producer_config(), settings.admin_config()
    assert consumer["security.protocol"] == producer["security.protocol"] == admin["security.protocol"] == "SASL_SSL"
    assert consumer["session.timeout.ms"] == "6000" and "session.timeout.ms" not in producer
    assert consumer["auto.offset.reset"] == "latest" and "auto.offset.reset" not in producer
    assert consumer["fetch.max.bytes"] == "1000000" and "fetch.max.bytes" not in producer
    assert producer["linger.ms"] == "50" and "linger.ms" not in consumer
    assert consumer["client.id"] == "c" and producer["client.id"] == "p"
    assert consumer["bootstrap.servers"] == "b:9092"
    assert "bootstrap.servers" not in settings.kafka_common  # not passed twice


def test_consumers_default_to_a_ten_second_session_timeout():
    """Fast to join on the embedded broker, fast to hand a dead member's partitions
    on, and accepted by Apache Kafka (group.min.session.timeout.ms is 6000)."""
    settings = build_settings({})
    assert settings.consumer_config()["session.timeout.ms"] == CONSUMER_DEFAULTS["session.timeout.ms"] == "10000"
    assert "session.timeout.ms" not in settings.producer_config()
    assert "session.timeout.ms" not in settings.admin_config()
    assert build_settings({"KAFKA_SESSION_TIMEOUT_MS": "45000"}).consumer_config()["session.timeout.ms"] == "45000"
    only_consumers = build_settings({"KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "30000"})
    assert only_consumers.consumer_config()["session.timeout.ms"] == "30000"


def test_the_processor_consumer_gets_the_default_and_the_users_override():
    from kafka_processor import consumer_settings

    assert consumer_settings(build_settings({}))["session.timeout.ms"] == "10000"
    assert consumer_settings(build_settings({"KAFKA_SESSION_TIMEOUT_MS": "20000"}))["session.timeout.ms"] == "20000"


def test_a_script_reads_only_its_settings_the_rest_keep_their_defaults():
    environ = {"WINDOW_SECONDS": "thirty", "METRICS_PORT": "x", "OUTPUT_TOPIC": "out", "KAFKA_SASL_USERNAME": "a"}
    settings = build_settings(environ, only=MONITOR_SETTINGS)
    assert settings.output_topic == "out"
    assert (settings.window_seconds, settings.metrics_port) == (Settings().window_seconds, Settings().metrics_port)
    assert settings.admin_config()["sasl.username"] == "a"  # KAFKA_* reach every script
    with pytest.raises(ConfigError):
        build_settings(environ)  # the processor reads them all


def test_the_loader_reads_what_the_parser_registered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("WINDOW_SECONDS", "thirty")
    monkeypatch.setenv("OUTPUT_TOPIC", "from-env")
    parser = OneLineArgumentParser(prog="x")
    add_settings_arguments(parser, only=MONITOR_SETTINGS)
    settings, _, _ = load_settings_or_exit(parser, ["--log-level", "debug"])
    assert (settings.output_topic, settings.log_level, settings.window_seconds) == ("from-env", "DEBUG", 30)
    with pytest.raises(ValueError, match="NO_SUCH_SETTING"):
        add_settings_arguments(OneLineArgumentParser(prog="y"), only=["NO_SUCH_SETTING"])


def test_secrets_are_masked_in_the_settings_line():
    settings = build_settings({"KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_SASL_USERNAME": "alice"})
    line = settings.describe()
    assert "hunter2" not in line
    assert "sasl.password=***" in line and "sasl.username=alice" in line
    assert redact("ssl.key.password", "x") == "***"
    assert redact("ssl.ca.location", "/etc/ca.pem") == "/etc/ca.pem"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WINDOW_SECONDS", "abc"),
        ("WINDOW_SECONDS", "0"),
        ("ALLOWED_LATENESS_SECONDS", "-1"),
        ("MAX_EVENT_TIME_SKEW_SECONDS", "1.5"),
        ("TOP_IPS", "0"),
        ("MAX_DISTINCT_PER_WINDOW", "0"),
        ("MAX_PROFILES_PER_WINDOW", "-3"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("INPUT_TOPIC", "  "),
        ("CLOSE_INTERVAL_SECONDS", "never"),
        ("METRICS_PORT", "70000"),
        ("CONSUME_BATCH_SIZE", "-3"),
        ("TOPIC_REPLICATION_FACTOR", "0"),
        ("TOPIC_REPLICATION_FACTOR", "-2"),
        ("TOPIC_MIN_INSYNC_REPLICAS", "-1"),
        ("DLQ_RETENTION_DAYS", "0"),
        ("PARTIALS_RETENTION_HOURS", "a day"),
        ("RECOMPUTE_FROM", "yesterday"),
        ("RECOMPUTE_FROM", "2026-12-01T00:00:00"),  # no zone: UTC or local?
        ("RECOMPUTE_MARGIN_SECONDS", "-5"),
    ],
)
def test_bad_value_names_the_setting(name, value):
    with pytest.raises(ConfigError) as caught:
        build_settings({name: value})
    assert caught.value.setting == name
    assert repr(value) in str(caught.value)


SCRIPTS = ["kafka_processor.py", "monitor_aggregated_data.py", "data_generator.py", "local_stack.py"]
# What each script lists in --help and reads.
SCRIPT_SETTINGS = {
    "kafka_processor.py": ALL_SETTINGS,
    "monitor_aggregated_data.py": MONITOR_SETTINGS,
    "data_generator.py": GENERATOR_SETTINGS,
    "local_stack.py": LOCAL_STACK_SETTINGS,
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"LOG_LEVEL": "LOUD"}, [], "LOG_LEVEL"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "  "}, [], "KAFKA_BOOTSTRAP_SERVERS"),
        ({}, ["--bootstrap-servers", ""], "--bootstrap-servers"),
        ({}, ["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_scripts_exit_2_with_one_line_naming_the_setting(script, env, args, named, tmp_path):
    _exits_2_naming(script, env, args, named, tmp_path)


@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"WINDOW_SECONDS": "thirty"}, [], "WINDOW_SECONDS"),
        ({"TOP_IPS": "-1"}, [], "TOP_IPS"),
        ({}, ["--allowed-lateness-seconds", "soon"], "--allowed-lateness-seconds"),
    ],
)
def test_processor_settings_exit_2_in_the_processor_and_the_local_stack(env, args, named, tmp_path):
    _exits_2_naming("kafka_processor.py", env, args, named, tmp_path)
    if not args:  # the local stack checks its children's settings before it starts anything
        _exits_2_naming("local_stack.py", {**env, "KAFKA_BOOTSTRAP_SERVERS": "localhost:1"}, args, named, tmp_path)


@pytest.mark.parametrize("script", ["monitor_aggregated_data.py", "data_generator.py", "local_stack.py"])
def test_processor_only_flags_are_not_accepted_elsewhere(script, tmp_path):
    _exits_2_naming(script, {}, ["--window-seconds", "10"], "--window-seconds", tmp_path)


def _exits_2_naming(script, env, args, named, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,  # no .env here
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_setting_with_its_default_and_variable_and_no_secret(script, tmp_path):
    secret_env = {"KAFKA_SASL_PASSWORD": "hunter2", "KAFKA_SASL_USERNAME": "alice", "WINDOW_SECONDS": "7"}
    result = run_script(script, "--help", env={"PATH": "/usr/bin:/bin", **secret_env}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    defaults = Settings()
    for env_name in ALL_SETTINGS:
        flag = "--" + env_name.lower().replace("_", "-")
        listed = f"{flag} VALUE" in text
        assert listed == (env_name in SCRIPT_SETTINGS[script]), f"{script}: {flag}"
        if listed:
            default = shown_default(env_name, getattr(defaults, _SETTINGS[env_name][0]))
            assert f"(default: {default}; env {env_name})" in text.replace("- ", "-"), env_name
    # The pass-through, explained once, with examples; never the values.
    assert "KAFKA_SECURITY_PROTOCOL=SASL_SSL -> security.protocol" in text
    assert "KAFKA_CONSUMER_<NAME> / KAFKA_PRODUCER_<NAME>" in text
    assert "session.timeout.ms=10000" in text
    assert "hunter2" not in result.stdout and "alice" not in result.stdout


@pytest.mark.broker
def test_settings_a_script_does_not_use_cannot_break_it(topics, tmp_path):
    """One `.env` for every script: the processor's settings, even wrong, are not the
    generator's or the monitor's business."""
    topics.create()
    foreign = {"WINDOW_SECONDS": "thirty", "METRICS_PORT": "x", "CONSUMER_GROUP_ID": " ", "TOP_IPS": "-1"}
    generated = run_script("data_generator.py", "--count", "5", env=topics.env(**foreign), cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    watched = run_script(
        "monitor_aggregated_data.py", "--idle-timeout", "1", env=topics.env(**foreign, INPUT_TOPIC=" "), cwd=tmp_path
    )
    assert watched.returncode == 0, watched.stderr


def test_unknown_librdkafka_property_exits_2_naming_it(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "kafka_processor.py")],
        env={"PATH": "/usr/bin:/bin", "KAFKA_NO_SUCH_PROPERTY": "1"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "KAFKA_NO_SUCH_PROPERTY" in lines[0]


def test_window_bounds_default_to_the_aggregators_own():
    """Written on both sides (settings and the pure aggregator): they must agree."""
    from config import Settings
    from core import window_value

    assert Settings().max_profiles_per_window == window_value.DEFAULT_MAX_PROFILES
    assert Settings().max_distinct_per_window == window_value.DEFAULT_MAX_DISTINCT


def test_topic_settings_default_to_the_brokers_replication_and_documented_retention():
    settings = build_settings({})
    assert settings.topic_replication_factor == -1  # the broker's default.replication.factor
    assert settings.topic_min_insync_replicas == 0  # not sent: the broker's default
    assert (settings.dlq_retention_days, settings.partials_retention_hours) == (14, 24)
    assert settings.recompute_from == 0


@pytest.mark.parametrize(
    "raw", ["2026-12-01T00:00:00Z", "2026-12-01T01:00:00+01:00", "2026-12-01 00:00:00z", "1796083200"]
)
def test_recompute_from_takes_a_utc_time_or_epoch_seconds(raw):
    assert build_settings({"RECOMPUTE_FROM": raw}).recompute_from == 1796083200


def test_recompute_from_has_the_short_flag_from():
    parser = OneLineArgumentParser(prog="p")
    add_settings_arguments(parser)
    settings, _, _ = load_settings_or_exit(parser, ["--from", "2026-12-01T00:00:00Z", "--env-file", ""])
    assert settings.recompute_from == 1796083200


@pytest.mark.parametrize("script", ["kafka_processor.py", "data_generator.py", "monitor_aggregated_data.py"])
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": "/nonexistent/ca.pem"}, "KAFKA_SSL_CA_LOCATION"),
        ({"KAFKA_NO_SUCH_PROPERTY": "1"}, "KAFKA_NO_SUCH_PROPERTY"),
    ],
)
def test_a_kafka_value_librdkafka_refuses_exits_2_in_every_script(script, env, named, tmp_path):
    """The generator exited 1 with librdkafka's raw error, the monitor with a traceback."""
    _exits_2_naming(script, {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", **env}, [], named, tmp_path)


# ---- the KIP-848 group protocol ------------------------------------------------------------


def test_the_consumer_protocol_leaves_out_what_librdkafka_forbids_in_that_mode_and_says_so():
    """librdkafka refuses to create a `group.protocol=consumer` consumer given any of
    these (the broker sets the session and heartbeat, `group.remote.assignor` replaces
    the strategy): our own 10 s session default would make every such processor exit 2."""
    environ = {
        "KAFKA_GROUP_PROTOCOL": "consumer",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "KAFKA_PARTITION_ASSIGNMENT_STRATEGY": "roundrobin",
        "KAFKA_CONSUMER_GROUP_PROTOCOL_TYPE": "consumer",
        "KAFKA_FETCH_MAX_BYTES": "1000000",
    }
    settings = build_settings(environ)
    consumer = settings.consumer_config()
    assert consumer["group.protocol"] == "consumer" and consumer["fetch.max.bytes"] == "1000000"
    assert not set(KIP848_LEFT_OUT) & set(consumer), consumer
    assert settings.incremental_assignment
    line = settings.describe()
    assert "session.timeout.ms=6000" not in line.split(" left out ")[0]
    assert line.endswith(
        " group.protocol=consumer left out group.protocol.type=consumer, heartbeat.interval.ms=1000,"
        " partition.assignment.strategy=roundrobin, session.timeout.ms=6000 (the broker sets the session:"
        " group.consumer.session.timeout.ms)"
    ), line
    # Our own default alone is left out too, and said so.
    default_only = build_settings({"KAFKA_GROUP_PROTOCOL": "Consumer"})
    assert "session.timeout.ms" not in default_only.consumer_config()
    assert "left out session.timeout.ms=10000" in default_only.describe()
    # A strategy left out is not refused either (the classic protocol refuses cooperative-sticky).
    cooperative = build_settings(
        {"KAFKA_GROUP_PROTOCOL": "consumer", "KAFKA_PARTITION_ASSIGNMENT_STRATEGY": "cooperative-sticky"}
    )
    assert "partition.assignment.strategy" not in cooperative.consumer_config()


def test_the_classic_protocol_keeps_every_setting_and_says_nothing_of_it():
    for environ in ({}, {"KAFKA_GROUP_PROTOCOL": "classic"}):
        settings = build_settings({**environ, "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"})
        consumer = settings.consumer_config()
        assert consumer["session.timeout.ms"] == "10000" and consumer["heartbeat.interval.ms"] == "1000"
        assert not settings.incremental_assignment
        assert "left out" not in settings.describe()
