"""The whole pipeline on one machine, no Docker: broker, generator, processor, monitor.

    python local_stack.py                 # everything; the monitor in this terminal
    python local_stack.py --broker-only   # broker + generator, for the two-terminal flow
                                          # (it prints the commands for terminals 2 and 3)

Where: the same `KAFKA_BOOTSTRAP_SERVERS` setting as the scripts (environment,
`.env`, or `--bootstrap-servers`), default localhost:29092. It must be one
`localhost:PORT` or `127.0.0.1:PORT`: the stack starts its embedded broker
(Tansu) on that port of this machine and gives the same address to the
generator, processor and monitor. Another port:

    KAFKA_BOOTSTRAP_SERVERS=localhost:29093 make run
    python local_stack.py --bootstrap-servers localhost:29093

A broker already listening there (a `make broker` in another terminal, the
compose file's Kafka, your own) is reused, never silently: the stack first checks
that it answers as a Kafka broker (if not, it stops with exit status 1, saying
so), then says that it reuses the broker at that address, that its generator
writes into it and into which topic, and how to pick a free port instead (the
`make` command when make started it). A reused broker is not ours to stop:
Ctrl-C leaves it running. Reuse rather than refusal, because the likely causes
are a stack or the compose Kafka running on purpose, where joining it is what
the user wants; and the message comes before anything is written.

The embedded broker keeps data in memory: stopping the stack forgets every
topic. Logs of the background parts go to `.local-stack/` (`--log-dir`).
Ctrl-C stops what the stack started, processor first so it commits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from config import (
    LOCAL_STACK_SETTINGS,
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    build_settings,
    exit_with_config_error,
    load_settings_or_exit,
)
from embedded_broker import BrokerError, EmbeddedBroker, port_is_open
from kafka_io import QUIET_CLIENT_LOGS

HERE = Path(__file__).resolve().parent
PROG = "local_stack.py"
DEFAULT_BOOTSTRAP = Settings().bootstrap_servers
# Host names that mean this machine (the embedded broker listens on 127.0.0.1).
LOCAL_HOSTS = ("localhost", "127.0.0.1")


def local_address(bootstrap_servers: str, setting: str = "KAFKA_BOOTSTRAP_SERVERS") -> tuple[str, int]:
    """(host, port) of the one broker on this machine the stack starts or reuses.

    `setting`: how the user gave it, to name it in the error."""
    if "," in bootstrap_servers:
        raise ConfigError(
            setting, f"the local stack runs one broker: give one localhost:PORT, got {bootstrap_servers!r}"
        )
    host, colon, port_text = bootstrap_servers.strip().rpartition(":")
    if not colon:
        raise ConfigError(setting, f"needs a port from 1 to 65535 after the host, got {bootstrap_servers!r}")
    if host not in LOCAL_HOSTS:
        raise ConfigError(
            setting,
            f"the local stack starts its broker on this machine: give localhost:PORT, got {bootstrap_servers!r} "
            "(to use another broker, run the scripts themselves with this setting)",
        )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(setting, f"needs a port from 1 to 65535 after the host, got {bootstrap_servers!r}")
    return host, int(port_text)


def answers_as_kafka(settings: Settings, timeout: float = 5.0) -> str | None:
    """None if a Kafka broker answers at the bootstrap address, else what went wrong."""
    admin = AdminClient({**QUIET_CLIENT_LOGS, **settings.admin_config()})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as error:
        return error.args[0].str() if error.args and isinstance(error.args[0], KafkaError) else str(error)
    return None


def a_free_port_after(port: int) -> int | None:
    """A port near `port` nothing listens on, to suggest."""
    for candidate in range(port + 1, min(port + 50, 65536)):
        if not port_is_open(candidate, "localhost"):
            return candidate
    return None


def _how_to_choose(host: str, port: int, broker_only: bool) -> str:
    """How to run the stack on another port, the way it was started (make or not)."""
    other = a_free_port_after(port) or port + 1
    address = f"{host}:{other}"
    if "MAKELEVEL" in os.environ:  # started by make: the flag cannot pass through it
        return f"KAFKA_BOOTSTRAP_SERVERS={address} make {'broker' if broker_only else 'run'}"
    return f"{_command('local_stack.py')} --bootstrap-servers {address}" + (" --broker-only" if broker_only else "")


def _command(script: str, *args: str) -> str:
    """A command line that works as written from the current directory: this very
    Python (the venv's, e.g. `.venv/bin/python`, not whatever `python` is first on PATH)."""

    def shown(path: str) -> str:
        relative = os.path.relpath(path)
        return relative if not relative.startswith("..") else path

    python = shown(sys.executable)
    if os.sep not in python:
        python = f".{os.sep}{python}"
    return " ".join(shlex.quote(part) for part in (python, shown(str(HERE / script)), *args))


def _spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path, to_log: bool = True) -> subprocess.Popen:
    log_file = open(log_dir / f"{name}.log", "ab") if to_log else None  # noqa: SIM115 - lives with the child
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=HERE,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file else None,
        stdin=subprocess.DEVNULL,
        # Own process group: Ctrl-C in this terminal reaches only us; we stop the
        # children in the right order ourselves.
        start_new_session=to_log,
    )


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print, unless the terminal or pipe is gone (`| tee` killed by the same Ctrl-C, a
    closed window): the shutdown must still stop the children and the broker."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


def _stop(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _listing(names: list[str]) -> str:
    """["processor", "broker"] -> "the processor and the broker"."""
    named = [f"the {name}" for name in names]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-only", action="store_true", help="start only the broker and the generator")
    parser.add_argument("--rate", type=float, default=20.0, help="live events per second (default: 20)")
    parser.add_argument(
        "--processors",
        type=_at_least_one,
        default=1,
        help="processors in the consumer group: they share the input partitions, one merges (default: 1)",
    )
    parser.add_argument(
        "--profile", choices=("realistic", "reference"), default="realistic", help="kind of data (default: realistic)"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=HERE / ".local-stack",
        help="logs of the background parts (default: .local-stack)",
    )
    add_settings_arguments(parser, only=LOCAL_STACK_SETTINGS)
    return parser


def main(argv: list[str] | None = None) -> int:
    settings, args, environ = load_settings_or_exit(build_parser(), argv)
    try:
        given_as = "KAFKA_BOOTSTRAP_SERVERS" if args.KAFKA_BOOTSTRAP_SERVERS is None else "--bootstrap-servers"
        host, port = local_address(settings.bootstrap_servers, given_as)
        # The children read every other setting from the same environment: a bad one
        # stops the stack now, in one line, rather than a child later in its log.
        input_topic = build_settings(environ).input_topic
    except ConfigError as error:
        exit_with_config_error(PROG, error)
    address = f"{host}:{port}"
    log_dir: Path = args.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    # The children see what we saw (.env included) and the address we settled on.
    env = {**environ, "KAFKA_BOOTSTRAP_SERVERS": address}
    # From here on Ctrl-C only asks to stop: a broker being started is still stopped.
    children: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    def running() -> bool:
        return not stopping and all(child.poll() is None for _, child in children)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)  # the terminal closed: stop the stack, leave nothing behind

    broker = None
    if port_is_open(port, host):
        problem = answers_as_kafka(settings)
        if problem is not None:
            _say(
                f"{PROG}: something listens on {address} but does not answer as a Kafka broker ({problem}); "
                f"choose a free port: {_how_to_choose(host, port, args.broker_only)}",
                sys.stderr,
            )
            return 1
        _say(
            f"broker: reusing the broker already listening on {address}, not started by this stack "
            f"(Ctrl-C leaves it running); the generator writes into its topic {input_topic}"
        )
        _say(f"        for a broker of its own, choose a free port: {_how_to_choose(host, port, args.broker_only)}")
    else:
        try:
            broker = EmbeddedBroker(port, log_path=log_dir / "broker.log").start()
        except BrokerError as error:
            _say(f"{PROG}: {error}", sys.stderr)
            return 1
        _say(f"broker: Tansu on {address} (in memory; log {log_dir / 'broker.log'})")

    def what_stops(*names: str) -> str:
        """What Ctrl-C stops, in that order, saying so when the broker is not ours."""
        stopped = [*names, "broker"] if broker else list(names)
        return _listing(stopped) + ("" if broker else f" (not the broker at {address}: it keeps running)")

    try:
        if stopping:
            return 0
        # Two minutes of past events first, so closed windows show up at once...
        backlog = ["data_generator.py", "--profile", args.profile, "--count", "2400", "--backlog-seconds", "120"]
        with open(log_dir / "generator.log", "ab") as generator_log:
            subprocess.run(
                [sys.executable, *backlog],
                cwd=HERE,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=generator_log,
            )
        # ...then a live stream.
        live = ["data_generator.py", "--profile", args.profile, "--rate", str(args.rate)]
        children.append(("generator", _spawn("generator", live, env, log_dir)))
        _say(f"generator: {args.profile} profile, {args.rate:g} events/s (log {log_dir / 'generator.log'})")
        if args.broker_only:
            extra = [] if address == DEFAULT_BOOTSTRAP else ["--bootstrap-servers", address]
            if args.env_file != ".env":
                extra += ["--env-file", args.env_file]
            _say("ready: run the processor and the monitor in two more terminals, from this directory:")
            _say(f"  {_command('kafka_processor.py', *extra)}")
            _say(f"  {_command('monitor_aggregated_data.py', *extra)}")
            _say(f"Ctrl-C stops {what_stops('generator')}")
            while running():
                time.sleep(0.5)
            return 0
        names = ["processor"] if args.processors == 1 else [f"processor-{n}" for n in range(1, args.processors + 1)]
        for name in reversed(names):
            children.insert(0, (name, _spawn(name, ["kafka_processor.py"], env, log_dir)))
        for name in names:
            _say(f"{name}: running (log {log_dir / (name + '.log')})")
        if len(names) > 1:
            _say(f"  {len(names)} processors in group {build_settings(environ).consumer_group_id}: Kafka shares out")
            _say("  the input partitions; one of them merges the parts (its log says so)")
        stopped = what_stops("processors" if len(names) > 1 else "processor", "generator", "monitor")
        _say(f"monitor: windows appear below as they close (Ctrl-C stops {stopped})\n")
        monitor = _spawn("monitor", ["monitor_aggregated_data.py", "--from-beginning"], env, log_dir, to_log=False)
        children.append(("monitor", monitor))
        while running():
            time.sleep(0.5)
        failed = [(name, child) for name, child in children if child.poll() not in (None, 0)]
        for name, child in failed:
            _say(f"{name} exited with status {child.returncode}; see {log_dir}", sys.stderr)
        return 1 if failed else 0
    except subprocess.CalledProcessError:
        _say(f"{PROG}: the generator could not fill the backlog; see {log_dir / 'generator.log'}", sys.stderr)
        return 1
    finally:
        _say(f"\nstopping {what_stops(*(name for name, _ in children))}")
        for _, child in children:  # processor first: it publishes and commits what is complete
            _stop(child)
        if broker:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
