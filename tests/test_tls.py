"""TLS end to end: generator, processor and monitor over TLS and mutual TLS, on both brokers;
SASL_SSL with SCRAM-SHA-512 on Apache Kafka.

Apache Kafka serves TLS on its own listeners (broker/apache_kafka.py: SSL and SASL_SSL
beside PLAINTEXT): one node whose SSL listener takes any client (server TLS) and whose
SASL_SSL listener knows a SCRAM user, and one whose SSL listener demands a client
certificate signed by the test's CA (`ssl.client.auth=required`: mutual TLS). The
embedded broker cannot serve TLS (tests/tls_support.py says why), so it advertises the
address of `TlsProxy`, which terminates TLS and forwards to the broker's plaintext port,
demanding a client certificate where mutual. Either way every connection the clients open
is TLS, verified against a CA made here, and the same test bodies run on both brokers.

A certificate or a password the broker refuses is one line naming the setting, exit 2,
within seconds: not retried like an absent broker.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.apache_kafka import BrokerTls, KafkaCluster
from broker.embedded_broker import EmbeddedBroker, free_port
from testkit.oracle import expected_windows
from testkit.processes import ProcessorProcess, Topics, read_topic, require_kafka, run_script, wait_until
from tests.tls_support import Pki, TlsProxy, make_pki

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# The SCRAM user on the SASL_SSL listener of the server-TLS Kafka node.
SCRAM_USER, SCRAM_PASSWORD = "pipeline", "pipeline-secret"


@dataclass
class TlsSite:
    """A broker reached over TLS: its TLS address, the PKI, whether it demands a client
    certificate, and what must run while a test talks to it (the proxy, for Tansu)."""

    broker: str  # "tansu" or "kafka"
    mutual: bool
    pki: Pki
    bootstrap: str
    serving: contextlib.AbstractContextManager

    def topics(self, env: dict[str, str], bootstrap: str | None = None) -> Topics:
        """A test's own names, and `env` (the security settings) for every script."""
        tag = uuid.uuid4().hex[:8]
        names = (f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}")
        return Topics(bootstrap or self.bootstrap, *names, extra_env=env, broker=self.broker)


class _Proxying(contextlib.AbstractContextManager):
    """A fresh TlsProxy for each test, in front of the module's embedded broker."""

    def __init__(self, pki: Pki, port: int, target_port: int, mutual: bool) -> None:
        self._args = (pki, port, target_port)
        self._mutual = mutual
        self._proxy: TlsProxy | None = None

    def __enter__(self) -> TlsProxy:
        self._proxy = TlsProxy(*self._args, require_client_certificate=self._mutual).start()
        return self._proxy

    def __exit__(self, *exc: object) -> None:
        self._proxy.stop()


@pytest.fixture(scope="module")
def tansu_behind_a_proxy(tmp_path_factory) -> Iterator[tuple[EmbeddedBroker, Pki, int]]:
    """(broker, PKI, the proxy port the broker advertises). Proxies come and go per test."""
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory / "pki")
    proxy_port = free_port()
    with EmbeddedBroker(log_path=directory / "broker.log", advertised_port=proxy_port) as broker:
        yield broker, pki, proxy_port


def _kafka_with_tls(directory: Path, mutual: bool) -> Iterator[tuple[KafkaCluster, Pki]]:
    require_kafka()
    pki = make_pki(directory / "pki")
    cluster = KafkaCluster(
        directory / "kafka",
        tls=BrokerTls(ca=pki.ca, certificate=pki.server_cert, key=pki.server_key),
        tls_client_auth=mutual,
        scram_users={} if mutual else {SCRAM_USER: SCRAM_PASSWORD},
    )
    with cluster:
        print(
            f"Kafka node ({'mutual TLS' if mutual else 'server TLS, SASL_SSL'}) ready in {cluster.start_seconds:.1f}s"
        )
        yield cluster, pki


@pytest.fixture(scope="module")
def kafka_tls(tmp_path_factory) -> Iterator[tuple[KafkaCluster, Pki]]:
    """A Kafka node whose SSL listener takes any client; SCRAM users on its SASL_SSL listener."""
    yield from _kafka_with_tls(tmp_path_factory.mktemp("kafka-tls"), mutual=False)


@pytest.fixture(scope="module")
def kafka_mutual_tls(tmp_path_factory) -> Iterator[tuple[KafkaCluster, Pki]]:
    """A Kafka node whose SSL listener demands a client certificate the test's CA signed."""
    yield from _kafka_with_tls(tmp_path_factory.mktemp("kafka-mtls"), mutual=True)


@pytest.fixture(scope="module")
def site(request) -> TlsSite:
    """The broker a test runs on, by name (tests parametrize it indirectly)."""
    broker, _, kind = request.param.partition("-")
    mutual = kind == "mutual-tls"
    if broker == "tansu":
        tansu, pki, proxy_port = request.getfixturevalue("tansu_behind_a_proxy")
        proxying = _Proxying(pki, proxy_port, tansu.port, mutual)
        return TlsSite("tansu", mutual, pki, f"127.0.0.1:{proxy_port}", proxying)
    cluster, pki = request.getfixturevalue("kafka_mutual_tls" if mutual else "kafka_tls")
    return TlsSite("kafka", mutual, pki, cluster.ssl_bootstrap_servers, contextlib.nullcontext())


def on_both(*kinds: str) -> list:
    """`site` parameters: each kind on Tansu (through the proxy) and on Kafka (its own listeners)."""
    return [
        value
        for kind in kinds
        for value in (f"tansu-{kind}", pytest.param(f"kafka-{kind}", marks=pytest.mark.kafka, id=f"kafka-{kind}"))
    ]


def tls_env(pki: Pki, mutual: bool, ca=None, certificate=None, key=None) -> dict[str, str]:
    env = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": str(ca or pki.ca)}
    if mutual:
        env["KAFKA_SSL_CERTIFICATE_LOCATION"] = str(certificate or pki.client_cert)
        env["KAFKA_SSL_KEY_LOCATION"] = str(key or pki.client_key)
    return env


def sasl_env(pki: Pki, password: str = SCRAM_PASSWORD) -> dict[str, str]:
    return {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SSL_CA_LOCATION": str(pki.ca),
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": SCRAM_USER,
        "KAFKA_SASL_PASSWORD": password,
    }


def read_all(topics: Topics, topic: str, timeout: float = 30.0) -> list:
    """Every record of `topic`, read to the end of each partition with the same security
    settings as the scripts (`topics.extra_env`)."""
    env = topics.extra_env
    config = {k[len("KAFKA_") :].lower().replace("_", "."): v for k, v in env.items() if k.startswith("KAFKA_")}
    return read_topic(topics.bootstrap, topic, timeout, config)


def exact_windows_end_to_end(topics: Topics, tmp_path) -> None:
    """The generator writes two minutes of past events, the processor publishes their
    windows, the monitor shows them, all with `topics.extra_env`'s security settings:
    the windows equal the test oracle's."""
    generated = run_script(
        "data_generator.py",
        *("--count", "3000", "--backlog-seconds", "120", "--seed", "19"),
        env=topics.env(INPUT_PARTITIONS="3"),
        cwd=tmp_path,
    )
    assert generated.returncode == 0, generated.stderr
    assert "sent 3000 events" in generated.stderr
    # The oracle reads what the generator wrote (the same way).
    records = read_all(topics, topics.input)
    assert len(records) == 3000
    expected = expected_windows([(m.value(), m.timestamp()[1]) for m in records])
    assert len(expected) >= 4

    processor = ProcessorProcess(topics.env(), tmp_path / "processor.log")
    try:
        wait_until(
            lambda: len({m.key() for m in read_all(topics, topics.output)}) >= len(expected),
            timeout=90,
            interval=1.0,
            message="every window",
        )
        published = {m.key().decode(): json.loads(m.value()) for m in read_all(topics, topics.output)}
        assert published == expected
        monitor = run_script(
            "monitor_aggregated_data.py",
            *("--json", "--from-beginning", "--exit-after", str(len(expected))),
            env=topics.env(),
            cwd=tmp_path,
        )
        assert monitor.returncode == 0, monitor.stderr
        shown = [json.loads(line) for line in monitor.stdout.strip().splitlines()]
        assert {window["window_start"]: window for window in shown} == expected
        code, _ = processor.terminate()
        assert code == 0
    finally:
        processor.stop_quietly()
    log = processor.log()
    assert "Traceback" not in log and "unreachable" not in log, log


@pytest.mark.parametrize("site", on_both("server-tls", "mutual-tls"), indirect=True)
def test_generator_processor_and_monitor_publish_exact_windows_over_tls(site, tmp_path):
    with site.serving:
        exact_windows_end_to_end(site.topics(tls_env(site.pki, site.mutual)), tmp_path)


@pytest.mark.kafka
def test_generator_processor_and_monitor_publish_exact_windows_over_sasl_ssl_with_scram(kafka_tls, tmp_path):
    """Kafka only: the embedded broker keeps no SCRAM user (docs/operations.md)."""
    cluster, pki = kafka_tls
    topics = TlsSite("kafka", False, pki, cluster.sasl_ssl_bootstrap_servers, contextlib.nullcontext()).topics(
        sasl_env(pki)
    )
    exact_windows_end_to_end(topics, tmp_path)


# ---- refusals: one line, exit 2 -----------------------------------------------------------------

SCRIPTS = [("kafka_processor.py", ()), ("data_generator.py", ("--count", "10")), ("monitor_aggregated_data.py", ())]
SCRIPT_IDS = [script for script, _ in SCRIPTS]


def refused_in_one_line(topics: Topics, tmp_path, script: str, args: tuple[str, ...]) -> str:
    """Run `script` to its end; it must exit 2 within seconds (no retrying) with exactly
    one line on stderr, at the most talkative log level too. Returns the line."""
    started = time.monotonic()
    result = run_script(script, *args, env=topics.env(LOG_LEVEL="DEBUG"), cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    print(script, result.returncode, f"{elapsed:.1f}s", result.stderr.strip())
    assert result.returncode == 2, result.stderr
    assert elapsed < 20, "a refusal must not be retried like an absent broker"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(("script", "args"), SCRIPTS, ids=SCRIPT_IDS)
@pytest.mark.parametrize("site", on_both("server-tls"), indirect=True)
def test_a_broker_certificate_the_client_does_not_trust_exits_2_with_one_line(site, tmp_path, script, args):
    """Not a retry loop: a certificate stays wrong however long one waits."""
    topics = site.topics(tls_env(site.pki, mutual=False, ca=site.pki.other_ca))
    with site.serving:
        line = refused_in_one_line(topics, tmp_path, script, args)
    assert line.startswith(f"{script}: bad setting KAFKA_SSL_CA_LOCATION: ")
    assert f"TLS with the broker at {topics.bootstrap} failed" in line
    assert "its certificate is not trusted" in line and "certificate verify failed" in line


@pytest.mark.parametrize(("script", "args"), SCRIPTS, ids=SCRIPT_IDS)
@pytest.mark.parametrize("client", ["no-certificate", "a-strangers-certificate"])
@pytest.mark.parametrize("site", on_both("mutual-tls"), indirect=True)
def test_a_client_certificate_the_broker_refuses_exits_2_with_one_line(site, tmp_path, client, script, args):
    """A broker that demands a client certificate, given none, or one its CA did not sign."""
    pki = site.pki
    if client == "no-certificate":
        env = tls_env(pki, mutual=False)
    else:
        env = tls_env(pki, mutual=True, certificate=pki.stranger_cert, key=pki.stranger_key)
    topics = site.topics(env)
    with site.serving:
        line = refused_in_one_line(topics, tmp_path, script, args)
    assert line.startswith(f"{script}: bad setting KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION: ")
    assert f"TLS with the broker at {topics.bootstrap} failed" in line
    if client == "no-certificate":
        assert "requires a client certificate (mutual TLS) and none is set" in line
    else:
        assert "certificate" in line.split("failed: ", 1)[1]


@pytest.mark.kafka
@pytest.mark.parametrize(("script", "args"), SCRIPTS, ids=SCRIPT_IDS)
def test_a_wrong_password_exits_2_with_one_line_naming_the_setting_and_no_secret(kafka_tls, tmp_path, script, args):
    """SASL_SSL with SCRAM-SHA-512 on Kafka's own listener: the broker refuses the login."""
    cluster, pki = kafka_tls
    password = f"wrong-{uuid.uuid4()}"
    site = TlsSite("kafka", False, pki, cluster.sasl_ssl_bootstrap_servers, contextlib.nullcontext())
    topics = site.topics(sasl_env(pki, password))
    line = refused_in_one_line(topics, tmp_path, script, args)
    assert line.startswith(f"{script}: bad setting KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD: ")
    assert f"the broker at {topics.bootstrap} refused them" in line
    assert "Authentication failed" in line or "invalid credentials" in line, line
    assert password not in line
