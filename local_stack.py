"""The whole pipeline on one machine, no Docker: broker, generator, processor, monitor.

    python local_stack.py                 # everything; the monitor in this terminal
    python local_stack.py --broker-only   # broker + generator, for the two-terminal flow:
                                          #   terminal 2: python kafka_processor.py
                                          #   terminal 3: python monitor_aggregated_data.py

The embedded broker (Tansu) listens on localhost:29092, the settings' default,
so the scripts need no flags. It keeps data in memory: stopping the stack
forgets every topic. Logs of the background parts go to `.local-stack/`.
Ctrl-C stops everything, processor first so it commits cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from embedded_broker import BrokerError, EmbeddedBroker, port_is_open

HERE = Path(__file__).resolve().parent
LOG_DIR = HERE / ".local-stack"
PORT = 29092
# Local runs only: Tansu makes a group member wait about half its session timeout
# before it joins, and the 45 s default would make the first window slow to appear.
LOCAL_ENV = {"KAFKA_BOOTSTRAP_SERVERS": f"localhost:{PORT}", "KAFKA_SESSION_TIMEOUT_MS": "6000"}


def _spawn(name: str, args: list[str], env: dict[str, str], to_log: bool = True) -> subprocess.Popen:
    log_file = open(LOG_DIR / f"{name}.log", "ab") if to_log else None  # noqa: SIM115 - lives with the child
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker-only", action="store_true", help="start only the broker and the generator")
    parser.add_argument("--rate", type=float, default=20.0, help="live events per second (default 20)")
    parser.add_argument("--profile", choices=("realistic", "reference"), default="realistic")
    args = parser.parse_args(argv)

    LOG_DIR.mkdir(exist_ok=True)
    env = {**os.environ, **LOCAL_ENV}
    broker = None
    if port_is_open(PORT):
        _say(f"a broker is already listening on localhost:{PORT}; using it")
    else:
        try:
            broker = EmbeddedBroker(PORT, log_path=LOG_DIR / "broker.log").start()
        except BrokerError as error:
            _say(f"local_stack.py: {error}", sys.stderr)
            return 1
        _say(f"broker: Tansu on localhost:{PORT} (in memory; log {LOG_DIR / 'broker.log'})")

    children: list[subprocess.Popen] = []
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGHUP, request_stop)  # the terminal closed: stop the stack, leave nothing behind
    try:
        # Two minutes of past events first, so closed windows show up at once...
        backlog = ["data_generator.py", "--profile", args.profile, "--count", "2400", "--backlog-seconds", "120"]
        with open(LOG_DIR / "generator.log", "ab") as generator_log:
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
        children.append(_spawn("generator", live, env))
        _say(f"generator: {args.profile} profile, {args.rate:g} events/s (log {LOG_DIR / 'generator.log'})")
        if args.broker_only:
            _say("ready: run `python kafka_processor.py` and `python monitor_aggregated_data.py` in two terminals")
            _say("Ctrl-C stops the broker and the generator")
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.5)
            return 0
        processor = _spawn("processor", ["kafka_processor.py"], env)
        children.insert(0, processor)
        _say(f"processor: running (log {LOG_DIR / 'processor.log'})")
        _say("monitor: windows appear below as they close (Ctrl-C stops everything)\n")
        monitor = _spawn("monitor", ["monitor_aggregated_data.py", "--from-beginning"], env, to_log=False)
        children.append(monitor)
        while not stopping and all(child.poll() is None for child in children):
            time.sleep(0.5)
        failed = [child for child in children if child.poll() not in (None, 0)]
        for child in failed:
            _say(f"{child.args[1]} exited with status {child.returncode}; see {LOG_DIR}", sys.stderr)
        return 1 if failed else 0
    except subprocess.CalledProcessError:
        _say(f"local_stack.py: the generator could not fill the backlog; see {LOG_DIR / 'generator.log'}", sys.stderr)
        return 1
    finally:
        _say("\nstopping: processor, generator, monitor, broker")
        for child in children:  # processor first: it publishes and commits what is complete
            _stop(child)
        if broker:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())
