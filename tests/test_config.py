"""config: precedence, validation, librdkafka pass-through, and the exit-2 contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, Settings, build_settings, read_environment, redact

ROOT = Path(__file__).resolve().parent.parent


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
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("INPUT_TOPIC", "  "),
        ("CLOSE_INTERVAL_SECONDS", "never"),
        ("METRICS_PORT", "70000"),
        ("CONSUME_BATCH_SIZE", "-3"),
    ],
)
def test_bad_value_names_the_setting(name, value):
    with pytest.raises(ConfigError) as caught:
        build_settings({name: value})
    assert caught.value.setting == name
    assert repr(value) in str(caught.value)


SCRIPTS = ["kafka_processor.py", "monitor_aggregated_data.py", "data_generator.py"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("env", "args", "named"),
    [
        ({"WINDOW_SECONDS": "thirty"}, [], "WINDOW_SECONDS"),
        ({"TOP_IPS": "-1"}, [], "TOP_IPS"),
        ({}, ["--allowed-lateness-seconds", "soon"], "--allowed-lateness-seconds"),
        ({}, ["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_scripts_exit_2_with_one_line_naming_the_setting(script, env, args, named, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,  # no .env here
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


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
