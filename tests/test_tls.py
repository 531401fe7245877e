"""TLS end to end: generator, processor and monitor through a TLS-terminating proxy.

The embedded broker cannot serve TLS (tests/tls_support.py says why), so it advertises
the address of `TlsProxy`, which terminates TLS and forwards to the broker's plaintext
port: every connection the clients open is TLS, verified against a CA made here, and
with `mutual` the proxy also demands a client certificate that CA signed.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from broker.embedded_broker import EmbeddedBroker, free_port
from tests.conftest import ProcessorProcess, Topics, read_topic, run_script, wait_until
from tests.oracle import expected_windows
from tests.tls_support import TlsProxy, make_pki

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """(broker, PKI, the proxy port the broker advertises). Proxies come and go per test."""
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory / "pki")
    proxy_port = free_port()
    with EmbeddedBroker(log_path=directory / "broker.log", advertised_port=proxy_port) as broker:
        yield broker, pki, proxy_port


def tls_env(pki, mutual: bool, ca=None) -> dict[str, str]:
    env = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_LOCATION": str(ca or pki.ca)}
    if mutual:
        env["KAFKA_SSL_CERTIFICATE_LOCATION"] = str(pki.client_cert)
        env["KAFKA_SSL_KEY_LOCATION"] = str(pki.client_key)
    return env


def read_all(bootstrap: str, topic: str, env: dict[str, str], timeout: float = 30.0) -> list:
    """Every record of `topic`, read over TLS to the end of each partition."""
    config = {k[len("KAFKA_") :].lower().replace("_", "."): v for k, v in env.items() if k.startswith("KAFKA_SSL")}
    return read_topic(bootstrap, topic, timeout, {"security.protocol": "SSL", **config})


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
def test_generator_processor_and_monitor_publish_exact_windows_over_tls(tls_broker, tmp_path, mutual):
    broker, pki, proxy_port = tls_broker
    tag = uuid.uuid4().hex[:8]
    bootstrap = f"127.0.0.1:{proxy_port}"
    topics = Topics(bootstrap, f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}", tls_env(pki, mutual))
    with TlsProxy(pki, proxy_port, broker.port, require_client_certificate=mutual):
        # The generator creates the input topic and writes two minutes of past events.
        generated = run_script(
            "data_generator.py",
            *("--count", "3000", "--backlog-seconds", "120", "--seed", "19"),
            env=topics.env(INPUT_PARTITIONS="3"),
            cwd=tmp_path,
        )
        assert generated.returncode == 0, generated.stderr
        assert "sent 3000 events" in generated.stderr
        # The oracle reads what the generator wrote (over TLS too).
        records = read_all(bootstrap, topics.input, topics.extra_env)
        assert len(records) == 3000
        expected = expected_windows([(m.value(), m.timestamp()[1]) for m in records])
        assert len(expected) >= 4

        processor = ProcessorProcess(topics.env(), tmp_path / "processor.log")
        try:
            wait_until(
                lambda: len({m.key() for m in read_all(bootstrap, topics.output, topics.extra_env)}) >= len(expected),
                timeout=90,
                interval=1.0,
                message="every window, over TLS",
            )
            published = {
                m.key().decode(): json.loads(m.value()) for m in read_all(bootstrap, topics.output, topics.extra_env)
            }
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


SCRIPTS = [("kafka_processor.py", ()), ("data_generator.py", ("--count", "10")), ("monitor_aggregated_data.py", ())]


@pytest.mark.parametrize(("script", "args"), SCRIPTS, ids=[s for s, _ in SCRIPTS])
@pytest.mark.parametrize("failure", ["untrusted-broker", "no-client-certificate"])
def test_a_failed_tls_handshake_exits_2_with_one_line(tls_broker, tmp_path, script, args, failure):
    """Not a retry loop: a certificate stays wrong however long one waits."""
    broker, pki, proxy_port = tls_broker
    tag = uuid.uuid4().hex[:8]
    mutual = failure == "no-client-certificate"
    # Untrusted: the client trusts another CA. No client certificate: trusts the right CA,
    # but the proxy demands a certificate and the client has none.
    env = tls_env(pki, mutual=False, ca=pki.other_ca if not mutual else pki.ca)
    topics = Topics(f"127.0.0.1:{proxy_port}", f"in-{tag}", f"out-{tag}", f"dlq-{tag}", f"group-{tag}", env)
    with TlsProxy(pki, proxy_port, broker.port, require_client_certificate=mutual):
        started = time.monotonic()
        result = run_script(script, *args, env=topics.env(LOG_LEVEL="DEBUG"), cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - started
    print(script, failure, result.returncode, f"{elapsed:.1f}s", result.stderr.strip())
    assert result.returncode == 2, result.stderr
    assert elapsed < 20, "a failed TLS handshake must not be retried like an absent broker"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if mutual:
        assert lines[0].startswith(f"{script}: bad setting KAFKA_SSL_CERTIFICATE_LOCATION/KAFKA_SSL_KEY_LOCATION: ")
        assert "requires a client certificate (mutual TLS) and none is set" in lines[0]
    else:
        assert lines[0].startswith(f"{script}: bad setting KAFKA_SSL_CA_LOCATION: ")
        assert "its certificate is not trusted" in lines[0] and "certificate verify failed" in lines[0]
    assert f"TLS with the broker at 127.0.0.1:{proxy_port} failed" in lines[0]
    assert "Traceback" not in result.stderr
