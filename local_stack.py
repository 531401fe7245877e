"""The whole pipeline on one machine, no Docker: broker, generator, processor(s), monitor.

    python local_stack.py                 # everything; the monitor's dashboard in this terminal
    python local_stack.py --processors 3  # three processors in one group: scale-out, failover
    python local_stack.py --broker-only   # broker + generator, for the three-terminal flow
                                          # (it prints the commands for terminals 2 and 3)

Where: the same `KAFKA_BOOTSTRAP_SERVERS` setting as the scripts (environment,
`.env`, or `--bootstrap-servers`), default localhost:29092. It must be one
`localhost:PORT` or `127.0.0.1:PORT`: the stack starts its embedded broker
(Tansu) on that port of this machine and gives the same address to the
generator, processors and monitor, with every other setting it was given. Another port:

    KAFKA_BOOTSTRAP_SERVERS=localhost:29093 make run
    python local_stack.py --bootstrap-servers localhost:29093

A broker already listening there (a `make broker` in another terminal, the
compose file's Kafka, your own) is reused, never silently: the stack first checks
that it answers as a Kafka broker (if not, it stops with exit status 1, saying
so), then says that it reuses the broker at that address, which topic its
generator writes into, and how to pick a free port instead (the `make` command
when make started it). A reused broker is not ours to stop: Ctrl-C leaves it
running. Reuse rather than refusal, because the likely causes are a stack or the
compose Kafka running on purpose, where joining it is what the user wants; and
the message comes before anything is written. When records already stream into
the input topic there (that stack's generator, the compose file's), the stack
writes no backlog and starts no generator, and says so: its processors count that
stream, each login once (a second generator doubled every window's logins).

A part that dies (a processor killed with SIGKILL, a crash) does not stop the
stack: the other processors carry on (Kafka moves the dead one's partitions to
them, and the merge if it merged), and the stack says so, under the dashboard's
header in a terminal ("processor-3 died (SIGKILL); 2 of 3 running; processor-1
merges"), as one line per event otherwise (`--plain`, or when stdout is not a
terminal). Which processor merges comes from the processors' own log lines
("this processor is now the merger" / "no longer the merger"). Press r in the
terminal to start the dead parts again, or give `--restart-after SECONDS`; the
dashboard names both keys from the start, and one event names every part that r
started again. Only Ctrl-C (or SIGTERM) stops everything, monitor first, then the
processors (so they commit cleanly), the generator and the broker; then the stack
prints what happened and what it stopped. It stops by itself (exit status 1) only
when its own broker dies, which takes every topic with it.

The embedded broker keeps data in memory: stopping the stack forgets every
topic. Logs of the background parts go to a folder of each run's own under
`.local-stack/` (`--log-dir`), such as `.local-stack/2026-12-07T21-00-00/`, with
`.local-stack/latest` pointing to the newest; the ten newest runs are kept. So a
search in a run's logs never finds an earlier run's lines, and two stacks at once
(`make broker` here, `make run` there) never write into the same files. A part
started again appends to its log.

Exit status: 0 stopped by Ctrl-C or SIGTERM; 1 the broker could not start or
died, something that is not Kafka listens on the port, or the backlog could not
be written; 2 a bad setting or flag.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from broker.embedded_broker import BrokerError, EmbeddedBroker, port_is_open
from broker.kafka_io import EXIT_NEVER_REACHED_BROKER, QUIET_CLIENT_LOGS
from config import (
    ConfigError,
    OneLineArgumentParser,
    Settings,
    add_settings_arguments,
    build_settings,
    exit_with_config_error,
    load_settings_or_exit,
)

# The settings the local stack reads itself (its processes read their own).
LOCAL_STACK_SETTINGS = ("KAFKA_BOOTSTRAP_SERVERS",)

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


def records_arriving(settings: Settings, topic: str, within: float = 3.0) -> bool:
    """Whether something writes into `topic` now: the end of one of its partitions moves
    within `within` seconds (a generator at 20 events/s moves one in a fraction of a
    second). False when the topic is not there, or the broker does not say."""
    consumer = Consumer(
        {
            **QUIET_CLIENT_LOGS,
            **settings.consumer_config(),
            # A throwaway group: it only reads partition ends, never joins or commits.
            "group.id": f"local-stack-{os.getpid()}",
        }
    )
    try:
        entry = consumer.list_topics(topic, timeout=5.0).topics.get(topic)
        if entry is None or entry.error is not None or not entry.partitions:
            return False
        partitions = [TopicPartition(topic, p) for p in entry.partitions]

        def ends() -> list[int]:
            return [consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)[1] for tp in partitions]

        first, deadline = ends(), time.monotonic() + within
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if ends() != first:
                return True
        return False
    except KafkaException:
        return False
    finally:
        consumer.close()


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


# What the processors log when the merge moves (merging/merger.py): how the stack knows who merges.
NOW_THE_MERGER = "this processor is now the merger"
NO_LONGER_THE_MERGER = "no longer the merger"
# A run's log folder: its start time, sortable (and the pid if two start in one second).
_RUN_FOLDER = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d(-\d+)?$")
# How many runs' log folders are kept.
_RUNS_KEPT = 10
# The files older versions of the stack wrote straight into the log directory.
_LEGACY_LOGS = ("broker.log", "generator.log", "processor.log", "processor-*.log")
# How often the stack looks at its children and its keys.
_WATCH_SECONDS = 0.25
# How long the monitor gets to leave the terminal's full screen before the stack prints.
_MONITOR_STOP_SECONDS = 5.0
# The processors' own stop takes at most 15 s (kafka_processor.py); then they are killed.
_PROCESSOR_STOP_SECONDS = 20.0


def describe_exit(status: int) -> str:
    """How a child ended, the way people say it: "SIGKILL", "exit status 1 (a crash)"."""
    if status < 0:
        try:
            return signal.Signals(-status).name
        except ValueError:
            return f"signal {-status}"
    meaning = {
        0: "stopped",
        1: "a crash or an error it cannot retry",
        2: "a bad setting",
        EXIT_NEVER_REACHED_BROKER: "it never reached the broker",
    }.get(status)
    return f"exit status {status}" + (f": {meaning}" if meaning else "")


def _listing(names: list[str]) -> str:
    """["processor-1", "generator", "broker"] -> "processor-1, the generator and the broker"
    (a numbered processor is a name; "processor", "generator"... are roles)."""
    named = [name if "-" in name else f"the {name}" for name in names]
    if not named:
        return "nothing"
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def _shown(path: Path) -> str:
    """A path as short as it can be said from the current directory."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def new_run_folder(log_dir: Path, keep: int = _RUNS_KEPT) -> Path:
    """A fresh folder for this run's logs under `log_dir`, `log_dir/latest` pointing to it;
    the oldest runs' folders beyond `keep` are removed.

    A folder per run, not files shared by every run: a search in it (or the stack's own
    look for the merger's line) never finds an earlier run, and a second stack started
    meanwhile (reusing this one's broker) never deletes or mixes into its files."""
    log_dir.mkdir(parents=True, exist_ok=True)
    name = time.strftime("%Y-%m-%dT%H-%M-%S")
    if (log_dir / name).exists():
        name += f"-{os.getpid()}"
    run = log_dir / name
    run.mkdir()
    with contextlib.suppress(OSError):  # a convenience: a file system without symlinks goes without
        pointer = log_dir / f".latest-{os.getpid()}"
        pointer.unlink(missing_ok=True)
        pointer.symlink_to(name, target_is_directory=True)
        os.replace(pointer, log_dir / "latest")
    runs = sorted(path for path in log_dir.iterdir() if path.is_dir() and _RUN_FOLDER.match(path.name))
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for pattern in _LEGACY_LOGS:  # from before runs had folders: they would only mislead
        for path in log_dir.glob(pattern):
            with contextlib.suppress(OSError):
                path.unlink()
    return run


@dataclass
class Child:
    """One process the stack runs and may start again: a script of this directory, its
    log (None: it writes to this terminal, as the monitor does), and how it ended."""

    name: str
    args: list[str]
    log_path: Path | None
    process: subprocess.Popen | None = None
    ended_at: float | None = None  # when the stack noticed it had ended
    status: int | None = None

    def start(self, env: dict[str, str], once: Sequence[str] = ()) -> None:
        """`once`: arguments for this start only, not for a restart."""
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child's now
        try:
            self.process = subprocess.Popen(
                [sys.executable, *self.args, *once],
                cwd=HERE,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                stdin=subprocess.DEVNULL,
                # Own session for the parts that log to files: Ctrl-C in this terminal
                # reaches only the stack (and the monitor), which stops them in order.
                start_new_session=log is not None,
            )
        finally:
            if log:
                log.close()  # the child has its own copy
        self.ended_at = self.status = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.ended_at is None

    def check_ended(self) -> bool:
        """True once, when the stack first sees that the process has ended."""
        if self.process is None or self.ended_at is not None:
            return False
        status = self.process.poll()
        if status is None:
            return False
        self.ended_at, self.status = time.monotonic(), status
        return True

    def how_it_ended(self) -> str:
        return describe_exit(self.status if self.status is not None else 0)

    def ended(self) -> str:
        """How it ended, as an event says it: died (SIGKILL), or stopped (exit status 0)."""
        return "stopped (exit status 0)" if self.status == 0 else f"died ({self.how_it_ended()})"

    def stop(self) -> None:
        """Ask it to stop (SIGTERM); `wait_stopped` waits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class MergerWatch:
    """Which processor merges, from the lines each processor logs when it becomes or
    stops being the merger. The stack owns the log files (one per processor, in a
    folder of this run's own), so a line is known to be this run's and whose it is."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self._logs = logs
        self._offsets = dict.fromkeys(logs, 0)
        self._partial = dict.fromkeys(logs, b"")

    def changes(self) -> list[tuple[str, bool]]:
        """(processor, merges now?) for each such line logged since the last call."""
        found = []
        for name, path in self._logs.items():
            try:
                with open(path, "rb") as log:
                    log.seek(self._offsets[name])
                    data = log.read()
            except OSError:
                continue
            self._offsets[name] += len(data)
            *lines, self._partial[name] = (self._partial[name] + data).split(b"\n")
            for line in lines:
                if NOW_THE_MERGER.encode() in line:
                    found.append((name, True))
                elif NO_LONGER_THE_MERGER.encode() in line:
                    found.append((name, False))
        return found


class Keys:
    """Single key presses from this terminal, without Enter and without echo (cbreak
    mode; Ctrl-C still interrupts). Nothing when stdin is not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._fd: int | None = None
        self._saved = None
        with contextlib.suppress(AttributeError, OSError, termios.error):
            if stream.isatty():
                fd = stream.fileno()
                self._saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
                self._fd = fd

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def read(self, timeout: float) -> str:
        """What was typed within `timeout` seconds ("" if nothing); waits that long otherwise."""
        if self._fd is None:
            time.sleep(timeout)
            return ""
        try:
            ready, _, _ = select.select([self._fd], [], [], timeout)
            return os.read(self._fd, 64).decode(errors="replace") if ready else ""
        except InterruptedError:
            return ""

    def restore(self) -> None:
        if self._fd is not None and self._saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        self._fd = None


@dataclass
class Crew:
    """The stack's restartable parts and what it tells the user about them: one line per
    event, and the state as "2 of 3 running; processor-1 merges"."""

    processors: list[Child]
    others: list[Child]  # the generator, the monitor
    merger_known: bool = True  # False when LOG_LEVEL hides the merger's lines
    merger: str | None = None
    events: list[tuple[float, str]] = field(default_factory=list)  # (wall clock, line)

    @property
    def children(self) -> list[Child]:
        return [*self.processors, *self.others]

    def dead(self) -> list[Child]:
        return [child for child in self.children if child.process is not None and not child.running]

    def running(self) -> str:
        return f"{sum(child.running for child in self.processors)} of {len(self.processors)} running"

    def merging(self) -> str:
        if self.merger:
            return f"{_listing([self.merger])} merges"
        if not self.merger_known:
            return "the merger is not known (LOG_LEVEL hides its log line)"
        return "no processor merges yet" if any(c.running for c in self.processors) else "nothing merges"

    def state(self) -> str:
        return f"{self.running()}; {self.merging()}"

    def note(self, event: str, with_merger: bool = True) -> str:
        """Record an event; the line to show: the event and the state it leaves."""
        state = self.state() if with_merger else self.running()
        line = f"{event}; {state}" if self.processors else event  # --broker-only: the generator alone
        self.events.append((time.time(), line))
        return line

    def dashboard_lines(self, restart_hint: str) -> list[str]:
        """The lines under the dashboard's header ("! " marks a warning): the state, the
        keys (from the start, not only once something died: a user should know them
        before they need them), and the latest event for a minute."""
        keys = f"{restart_hint}; Ctrl-C stops everything"
        dead = self.dead()
        if dead:
            now = time.monotonic()
            deaths = ", ".join(f"{_listing([c.name])} {c.ended()} {now - c.ended_at:.0f}s ago" for c in dead)
            return [f"! {deaths}; {self.state()}", keys]
        running = [c for c in self.processors if c.running]
        if len(running) == 1:
            pids = f"pid {running[0].process.pid}"
        else:  # where `kill` and `ps` find them
            pids = ", ".join(f"{c.name} pid {c.process.pid}" for c in running)
        lines = [f"{self.running().replace(' running', ' processors running')} ({pids}); {self.merging()}", keys]
        if self.events and time.time() - self.events[-1][0] < 60:
            when, line = self.events[-1]
            lines.append(f"{time.strftime('%H:%M:%S', time.localtime(when))} {line}")
        return lines


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print, unless the terminal or pipe is gone (`| tee` killed by the same Ctrl-C, a
    closed window): the shutdown must still stop the children and the broker."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step: the monitor reads it at every redraw."""
    partial = path.with_name(path.name + ".new")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text!r}")
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
        help="logs of the background parts, started afresh by each run (default: .local-stack)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="no dashboard: the monitor prints a line per window, the stack a line per event"
        " (the default when stdout is not a terminal)",
    )
    parser.add_argument(
        "--restart-after",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="start a part that died again after SECONDS (default: never; in a terminal, press r)",
    )
    add_settings_arguments(parser, only=LOCAL_STACK_SETTINGS)
    return parser


class LocalStack:
    """Runs the parts, watches them until Ctrl-C, and stops them in order."""

    def __init__(
        self, args: argparse.Namespace, settings: Settings, environ: dict[str, str], host: str, port: int
    ) -> None:
        self.args = args
        self.settings = settings
        self.address = f"{host}:{port}"
        self.host, self.port = host, port
        self.log_dir = new_run_folder(args.log_dir.resolve())  # absolute: the children run elsewhere
        # The children see what we saw (.env included) and the address we settled on.
        self.env = {**environ, "KAFKA_BOOTSTRAP_SERVERS": self.address}
        child_settings = build_settings(environ)
        self.input_topic = child_settings.input_topic
        self.group = child_settings.consumer_group_id
        self.broker: EmbeddedBroker | None = None
        # A reused broker into whose input topic records already stream (another stack's
        # generator, the compose file's): this stack then writes none of its own.
        self.stream_there = False
        self.stopping = False
        self.dashboard = False  # the monitor draws in this terminal
        self.keys: Keys | None = None
        self.status_path = self.log_dir / "status.txt"
        self.live_from = time.time()  # where the live stream begins; fill_backlog() sets it
        names = ["processor"] if args.processors == 1 else [f"processor-{n}" for n in range(1, args.processors + 1)]
        processors = [] if args.broker_only else [Child(n, ["kafka_processor.py"], self._log(n)) for n in names]
        live = ["data_generator.py", "--profile", args.profile, "--rate", str(args.rate)]
        self.generator = Child("generator", live, self._log("generator"))
        self.monitor = Child("monitor", ["monitor_aggregated_data.py", "--from-beginning"], None)
        others = [self.generator] if args.broker_only else [self.generator, self.monitor]
        merger_known = child_settings.log_level in ("DEBUG", "INFO")
        self.crew = Crew(processors, others, merger_known=merger_known)
        self.merger_watch = MergerWatch({c.name: c.log_path for c in processors if c.log_path})

    def _log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    # ---- start-up -----------------------------------------------------------------

    def start_broker(self) -> int | None:
        """Start or reuse the broker; an exit status if the stack cannot go on."""
        if port_is_open(self.port, self.host):
            problem = answers_as_kafka(self.settings)
            if problem is not None:
                _say(
                    f"{PROG}: something listens on {self.address} but does not answer as a Kafka broker ({problem}); "
                    f"choose a free port: {_how_to_choose(self.host, self.port, self.args.broker_only)}",
                    sys.stderr,
                )
                return 1
            self.stream_there = records_arriving(build_settings(self.env), self.input_topic)
            writes = "records already stream into" if self.stream_there else "the generator writes into"
            _say(
                f"broker: reusing the broker already listening on {self.address}, not started by this stack "
                f"(Ctrl-C leaves it running); {writes} its topic {self.input_topic}"
            )
            choose = _how_to_choose(self.host, self.port, self.args.broker_only)
            _say(f"        for a broker of its own, choose a free port: {choose}")
            return None
        try:
            self.broker = EmbeddedBroker(self.port, log_path=self._log("broker")).start()
        except BrokerError as error:
            _say(f"{PROG}: {error}", sys.stderr)
            return 1
        _say(f"broker: Tansu on {self.address} (in memory; log {_shown(self._log('broker'))})")
        return None

    def what_stops(self, names: list[str]) -> str:
        """What Ctrl-C stops, in that order, saying so when the broker is not ours."""
        stopped = [*names, "broker"] if self.broker else names
        return _listing(stopped) + ("" if self.broker else f" (not the broker at {self.address}: it keeps running)")

    def fill_backlog(self) -> None:
        """Two minutes of past events first, so closed windows show up at once. The live
        generator carries on from the backlog's last moment (it takes a few seconds to
        start), so no second of the stream is without events."""
        self.live_from = time.time()
        since = f"{self.live_from - 120:.3f}"
        backlog = ["data_generator.py", "--profile", self.args.profile, "--count", "2400", "--rate", "20"]
        backlog += ["--since", since]
        with open(self._log("generator"), "ab") as generator_log:
            subprocess.run(
                [sys.executable, *backlog],
                cwd=HERE,
                env=self.env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=generator_log,
            )

    def start_parts(self) -> None:
        self.keys = Keys(sys.stdin)
        if self.stream_there:
            # Beside a `make broker`: a second generator doubled every window's logins.
            self.crew.others.remove(self.generator)
            _say(
                f"generator: none started: records already stream into {self.input_topic} on {self.address}"
                " (from the stack or compose file that runs that broker); they are what this stack counts"
            )
        else:
            self.generator.start(self.env, once=["--since", f"{self.live_from:.3f}"])
            log = _shown(self._log("generator"))
            _say(f"generator: {self.args.profile} profile, {self.args.rate:g} events/s (log {log})")
        if self.args.broker_only:
            extra = [] if self.address == DEFAULT_BOOTSTRAP else ["--bootstrap-servers", self.address]
            if self.args.env_file != ".env":
                extra += ["--env-file", self.args.env_file]
            _say("ready: run the processor and the monitor in two more terminals, from this directory:")
            _say(f"  {_command('kafka_processor.py', *extra)}")
            _say(f"  {_command('monitor_aggregated_data.py', *extra)}")
            _say(f"Ctrl-C stops {self.what_stops([c.name for c in self.crew.others])}")
            return
        for processor in self.crew.processors:
            processor.start({**self.env, "PROCESSOR_NAME": processor.name})
            _say(f"{processor.name}: pid {processor.process.pid} (log {_shown(processor.log_path)})")
        if len(self.crew.processors) > 1:
            _say(f"  {len(self.crew.processors)} processors in group {self.group} share out the input partitions;")
            _say("  one merges the parts into windows; when one dies, the others carry on")
        self.dashboard = not self.args.plain and sys.stdout.isatty()
        parts = [c.name for c in self.crew.children]
        if self.dashboard:
            _write_atomically(self.status_path, "")
            self.monitor.args = [*self.monitor.args, "--status-file", str(self.status_path)]
            _say(f"monitor: the dashboard takes this terminal (Ctrl-C stops {self.what_stops(parts)})")
        else:
            _say(f"monitor: windows appear below as they close (Ctrl-C stops {self.what_stops(parts)})\n")
        self.monitor.start(self.env)

    # ---- watching -------------------------------------------------------------------

    def restart_hint(self, dead: list[Child]) -> str:
        """How the dead parts start again: a key, or --restart-after (with none dead yet:
        how a part that dies would)."""
        them = _listing([c.name for c in dead]) if dead else "a part that died"
        keys = self.keys is not None and self.keys.enabled
        if self.args.restart_after is not None:
            again = f"{them} starts again {self.args.restart_after:g}s after it ended"
            return again + (" (or press r)" if keys else "")
        if keys:
            return f"press r to start {them} again"
        return "to start a part that died again, run the stack with --restart-after SECONDS"

    def tell(self, line: str) -> None:
        """An event: a line of its own, unless the dashboard is up (then under its header)."""
        if not (self.dashboard and self.monitor.running):
            _say(line)

    def restart(self, children: list[Child]) -> None:
        """Start `children` again; one event names every one of them (the dashboard
        shows the latest event only)."""
        for child in children:
            env = {**self.env, "PROCESSOR_NAME": child.name} if child in self.crew.processors else self.env
            child.start(env)
        pids = [str(child.process.pid) for child in children]
        which = f"pid {pids[0]}" if len(pids) == 1 else f"pids {', '.join(pids)}"
        self.tell(self.crew.note(f"{_listing([c.name for c in children])} started again ({which})"))

    def watch(self) -> int:
        """Until Ctrl-C: report deaths and merger changes, start dead parts again on request."""
        crew = self.crew
        while not self.stopping:
            if self.broker and self.broker.process and self.broker.process.poll() is not None:
                status = describe_exit(self.broker.process.returncode)
                _say(f"{PROG}: the broker died ({status}; log {_shown(self._log('broker'))}), and every topic with it")
                return 1
            for child in crew.children:
                if child.check_ended():
                    if child.name == crew.merger:
                        crew.merger = None
                    self.tell(crew.note(f"{_listing([child.name])} {child.ended()}"))
                    if child.log_path and child.status != 0:
                        self.tell(f"  its log: {_shown(child.log_path)}; {self.restart_hint([child])}")
            for name, merges in self.merger_watch.changes():
                if merges and crew.merger != name:
                    crew.merger = name
                    self.tell(crew.note(f"{_listing([name])} is now the merger", with_merger=False))
                elif not merges and crew.merger == name:
                    crew.merger = None
                    self.tell(crew.note(f"{_listing([name])} is no longer the merger"))
            pressed = self.keys.read(_WATCH_SECONDS) if self.keys else (time.sleep(_WATCH_SECONDS) or "")
            if self.stopping:
                break
            now, after = time.monotonic(), self.args.restart_after
            due = [
                child
                for child in crew.dead()
                if "r" in pressed.lower() or (after is not None and now - child.ended_at >= after)
            ]
            if due:
                self.restart(due)
            if self.dashboard:
                with contextlib.suppress(OSError):
                    lines = crew.dashboard_lines(self.restart_hint(crew.dead()))
                    _write_atomically(self.status_path, "\n".join(lines) + "\n")
        return 0

    # ---- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """Monitor first (so that the terminal is ours to print in), then the processors
        together (each publishes and commits what is complete), the generator, the broker."""
        self.monitor.stop()
        self.monitor.wait_stopped(_MONITOR_STOP_SECONDS)
        if self.keys is not None:
            self.keys.restore()
        if self.dashboard and self.crew.events:
            _say("while the dashboard was up:")
            for when, line in self.crew.events[-20:]:
                _say(f"  {time.strftime('%H:%M:%S', time.localtime(when))} {line}")
        running = [c for c in self.crew.processors if c.process is not None and c.process.poll() is None]
        if self.generator.process is not None and self.generator.process.poll() is None:
            running.append(self.generator)
        names = [c.name for c in running]
        if self.monitor.process is not None:
            names.append("monitor")
        _say(f"\nstopping {self.what_stops(names)}")
        for processor in self.crew.processors:
            processor.stop()
        deadline = time.monotonic() + _PROCESSOR_STOP_SECONDS
        for processor in self.crew.processors:
            processor.wait_stopped(deadline - time.monotonic())
        self.generator.stop()
        self.generator.wait_stopped(15)
        if self.broker:
            self.broker.stop()
        with contextlib.suppress(OSError):
            self.status_path.unlink(missing_ok=True)
        _say(f"stopped; this run's logs are in {_shown(self.log_dir)}")


def main(argv: list[str] | None = None) -> int:
    settings, args, environ = load_settings_or_exit(build_parser(), argv)
    try:
        given_as = "KAFKA_BOOTSTRAP_SERVERS" if args.KAFKA_BOOTSTRAP_SERVERS is None else "--bootstrap-servers"
        host, port = local_address(settings.bootstrap_servers, given_as)
        # The children read every other setting from the same environment: a bad one
        # stops the stack now, in one line, rather than a child later in its log.
        build_settings(environ)
    except ConfigError as error:
        exit_with_config_error(PROG, error)
    stack = LocalStack(args, settings, environ, host, port)
    # From here on Ctrl-C only asks to stop: a broker being started is still stopped.
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    signal.signal(signal.SIGHUP, stack.request_stop)  # the terminal closed: stop the stack, leave nothing behind
    failed = stack.start_broker()
    if failed is not None:
        return failed
    try:
        if stack.stopping:
            return 0
        if not stack.stream_there:
            stack.fill_backlog()
        stack.start_parts()
        return stack.watch()
    except subprocess.CalledProcessError:
        backlog_log = _shown(stack.log_dir / "generator.log")
        _say(f"{PROG}: the generator could not fill the backlog; see {backlog_log}", sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
