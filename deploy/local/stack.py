#!/usr/bin/env python3
"""Run the local stack of the tests and the demo: Kafka, an S3 server and Prometheus.

Usage: python deploy/local/stack.py start|stop|status|env|kafka-jars

Every part listens on a free port of 127.0.0.1 and runs in its own session, so it
outlives the command that started it. Ports and process ids are stored in `.stack/`
at the repository root and logs go to `.stack/logs/`. Starting a running part
returns at once. Each start begins with empty data: stop discards every topic,
bucket and time series.

- Kafka: one KRaft node (broker and controller in one JVM) from the Maven jars
  that `kafka-jars` copies into `.cache/kafka/lib`.
- S3: moto's standalone server from the repository's `.venv`.
- Prometheus: Debian's `prometheus` binary with its own configuration. It scrapes
  itself and the targets listed in `.stack/targets.json` (file_sd format, read
  every second), and loads alert rules from `deploy/prometheus/rules/*.yml`.

Other code imports this file by path and calls `ensure_running()` for the
endpoints, or `stop_all()`. A test that takes its broker away uses a `KafkaNode`
of its own instead of the shared Kafka. Only the standard library is used, so the system
Python can run it before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ROOT / ".stack"
LOG_DIR = STATE_DIR / "logs"
TARGETS_FILE = STATE_DIR / "targets.json"
KAFKA_POM_DIR = ROOT / "deploy" / "local" / "kafka"
KAFKA_LIB_DIR = ROOT / ".cache" / "kafka" / "lib"
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
HOST = "127.0.0.1"

PARTS = ("kafka", "s3", "prometheus")

# Dummy credentials: moto accepts any, and real ones must never reach a test.
AWS_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

# Seconds that start waits for a part to become ready. A cold JVM on 2 busy cores needs the most.
READY_TIMEOUT_SECONDS = {"kafka": 120.0, "s3": 60.0, "prometheus": 60.0}
STOP_TIMEOUT_SECONDS = 30.0


class StackError(Exception):
    """A part of the stack could not be set up, started or reached."""


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Addresses of a running stack."""

    kafka_bootstrap: str
    s3_endpoint: str
    prometheus_url: str
    targets_file: Path


# ---------------------------------------------------------------- state files


def _state_path(part: str) -> Path:
    return STATE_DIR / f"{part}.json"


def _read_state(part: str) -> dict | None:
    try:
        return json.loads(_state_path(part).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_state(part: str, state: dict) -> None:
    _state_path(part).write_text(json.dumps(state, indent=2) + "\n")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialize start and stop, so a test session and a demo can start the stack together."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _free_port() -> int:
    # NOTE: another program may take the port between this probe and the part's bind.
    # Start then fails, and the part's log shows "address in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- processes


def _process_alive(state: dict) -> bool:
    """Tell whether the stored pid still runs this stack's part, not a recycled pid.

    Every part runs in STATE_DIR, and its command line contains the stored marker.
    """
    pid = state.get("pid")
    if not pid:
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cwd == str(STATE_DIR) and state["marker"].encode() in cmdline


def _spawn(part: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / f"{part}-stdout.log", "ab") as output:
        return subprocess.Popen(
            command,
            cwd=STATE_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _log_tail(part: str, lines: int = 20) -> str:
    texts = []
    for path in sorted(LOG_DIR.glob(f"{part}*.log")):
        content = path.read_text(errors="replace").splitlines()[-lines:]
        texts.append(f"--- {path}\n" + "\n".join(content))
    return "\n".join(texts)


def _wait_ready(part: str, process: subprocess.Popen, check: Callable[[], bool], timeout: float | None = None) -> None:
    timeout = READY_TIMEOUT_SECONDS[part] if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{part} exited with status {process.returncode} while starting\n{_log_tail(part)}")
        if check():
            return
        time.sleep(0.3)
    _terminate(process.pid)
    raise StackError(f"{part} did not become ready within {timeout:.0f} s\n{_log_tail(part)}")


def _terminate(pid: int) -> None:
    """Send SIGTERM to the part's process group, then SIGKILL if it has not exited in time."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not _pid_running(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _pid_running(pid: int) -> bool:
    # Reap the child when this process started it, so a zombie does not look alive.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return status != "Z"


# ---------------------------------------------------------------- Kafka


def resolve_kafka_jars() -> Path:
    """Copy the broker's jars from Maven into .cache/kafka/lib unless they are already there."""
    marker = KAFKA_LIB_DIR / ".complete"
    pom = KAFKA_POM_DIR / "pom.xml"
    if marker.exists() and marker.read_text() == pom.read_text():
        return KAFKA_LIB_DIR
    if shutil.which("mvn") is None:
        raise StackError("mvn not found: install Maven (Debian package maven) to resolve the Kafka jars")
    shutil.rmtree(KAFKA_LIB_DIR, ignore_errors=True)
    # Output is kept for errors only, because Maven 3.8 prints bare color codes even with --quiet.
    result = subprocess.run(
        [
            "mvn", "--batch-mode", "--quiet", "--file", str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={KAFKA_LIB_DIR}",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise StackError(f"mvn failed to resolve the Kafka jars of {pom} (status {result.returncode}):\n{output}")
    # The copy of the POM marks a finished copy and a POM change triggers a new one.
    marker.write_text(pom.read_text())
    return KAFKA_LIB_DIR


def _kafka_properties(port: int, controller_port: int, data_dir: Path) -> str:
    return f"""\
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers={HOST}:{controller_port}
log.dirs={data_dir}
num.partitions=1
# One node: internal topics can have only one replica, or transactions never start.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# Fewer partitions than the default 50 make the first group and transaction start sooner.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# Tests join and leave groups all the time, and the default delay adds 3 s to each first join.
group.initial.rebalance.delay.ms=0
"""


def _kafka_log4j_config(log_file: Path) -> str:
    return f"""\
appender.file.type=File
appender.file.name=file
appender.file.fileName={log_file}
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
"""


def _kafka_cluster_id() -> str:
    # Kafka cluster ids are 16 random bytes in URL-safe base64 without padding.
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def kafka_metadata_ok(bootstrap: str, timeout: float = 2.0) -> bool:
    """Send a Kafka Metadata request (version 4) and tell whether the broker listed itself."""
    host, _, port = bootstrap.rpartition(":")
    client_id = b"caption-worker-stack"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    header = struct.pack(">hhih", 3, 4, 7, len(client_id)) + client_id
    # Body: topics=null (all topics), allow_auto_topic_creation=false.
    body = struct.pack(">i?", -1, False)
    request = header + body
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as connection:
            connection.sendall(struct.pack(">i", len(request)) + request)
            size = struct.unpack(">i", _receive_exactly(connection, 4))[0]
            response = _receive_exactly(connection, size)
    except (OSError, struct.error):
        return False
    # Response: correlation_id, throttle_time_ms, then the broker array's length.
    correlation_id, _throttle, broker_count = struct.unpack(">iii", response[:12])
    return correlation_id == 7 and broker_count >= 1


def _receive_exactly(connection: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = connection.recv(size - len(chunks))
        if not chunk:
            raise OSError("connection closed before the whole response arrived")
        chunks += chunk
    return bytes(chunks)


def _prepare_kafka_node(kafka_dir: Path, port: int, controller_port: int, log_file: Path) -> list[str]:
    """Write a node's configuration into an empty `kafka_dir`, format its storage, and return its start command."""
    lib_dir = resolve_kafka_jars()
    java = shutil.which("java")
    if java is None:
        raise StackError("java not found: install Java 17 (Debian package openjdk-17-jre-headless)")

    data_dir = kafka_dir / "data"
    data_dir.mkdir(parents=True)
    properties = kafka_dir / "server.properties"
    properties.write_text(_kafka_properties(port, controller_port, data_dir))
    log4j_config = kafka_dir / "log4j2.properties"
    log4j_config.write_text(_kafka_log4j_config(log_file))

    java_command = [
        java, "-Xms128m", "-Xmx512m",
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp", f"{lib_dir}/*",
    ]
    subprocess.run(
        java_command + [
            "kafka.tools.StorageTool", "format", "--standalone",
            "--cluster-id", _kafka_cluster_id(), "--config", str(properties),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return java_command + ["kafka.Kafka", str(properties)]


def _start_kafka() -> dict:
    kafka_dir = STATE_DIR / "kafka"
    shutil.rmtree(kafka_dir, ignore_errors=True)
    port, controller_port = _free_port(), _free_port()
    command = _prepare_kafka_node(kafka_dir, port, controller_port, LOG_DIR / "kafka.log")
    process = _spawn("kafka", command)
    bootstrap = f"{HOST}:{port}"
    _wait_ready("kafka", process, lambda: kafka_metadata_ok(bootstrap))
    return {"pid": process.pid, "marker": command[-1], "port": port, "controller_port": controller_port}


class KafkaNode:
    """A one-node Kafka of its own, for a test that takes its broker away without disturbing the shared one.

    The node lives in `.stack/<name>/` and logs to `.stack/logs/<name>.log`. It keeps
    its ports and its data across `stop()` and `start()`, as a restarted broker does.
    `pause()` and `resume()` send SIGSTOP and SIGCONT, for a broker that accepts
    connections but stops responding. `remove()` stops it and deletes its directory.
    """

    def __init__(self, name: str) -> None:
        if not name.startswith("private-kafka-"):
            # The prefix keeps _log_tail("kafka") from mixing in this node's logs.
            raise ValueError(f"KafkaNode name {name!r} must start with 'private-kafka-'")
        self.name = name
        self.directory = STATE_DIR / name
        self.port = _free_port()
        self.controller_port = _free_port()
        self._command: list[str] | None = None
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        """Start the node, formatting its storage the first time, and return once it serves metadata.

        NOTE: while the node is stopped another program may bind its port, and the restart then fails.
        """
        if self._command is None:
            shutil.rmtree(self.directory, ignore_errors=True)
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            self._command = _prepare_kafka_node(self.directory, self.port, self.controller_port,
                                                LOG_DIR / f"{self.name}.log")
        self._process = _spawn(self.name, self._command)
        _wait_ready(self.name, self._process, lambda: kafka_metadata_ok(self.bootstrap),
                    timeout=READY_TIMEOUT_SECONDS["kafka"])

    def stop(self) -> None:
        """Stop the node with SIGTERM (SIGKILL after STOP_TIMEOUT_SECONDS), keeping its data."""
        if self._process is not None:
            self.resume()
            _terminate(self._process.pid)
            self._process = None

    def pause(self) -> None:
        """Freeze the node with SIGSTOP, so connections stay open but no request gets a response."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGCONT)

    def remove(self) -> None:
        """Stop the node and delete its directory and log."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        (LOG_DIR / f"{self.name}.log").unlink(missing_ok=True)
        (LOG_DIR / f"{self.name}-stdout.log").unlink(missing_ok=True)


# ---------------------------------------------------------------- S3 (moto)


def _venv_python() -> str:
    candidate = ROOT / ".venv" / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    raise StackError(f"{candidate} not found: run deploy/local/setup.sh (or make setup) first")


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _start_s3() -> dict:
    port = _free_port()
    env = {**os.environ, **AWS_DUMMY_ENV}
    # moto's server keeps everything in memory, so a new process starts with no buckets.
    command = [_venv_python(), "-m", "moto.server", "-H", HOST, "-p", str(port)]
    process = _spawn("s3", command, env=env)
    _wait_ready("s3", process, lambda: _http_ok(f"http://{HOST}:{port}/moto-api/"))
    return {"pid": process.pid, "marker": "moto.server", "port": port}


# ---------------------------------------------------------------- Prometheus


def _prometheus_config(port: int) -> str:
    rules = f'  - "{RULES_DIR}/*.yml"\n'
    return f"""\
# Written by deploy/local/stack.py at each start.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s

rule_files:
{rules}
scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["{HOST}:{port}"]
  # Tests and the demo list workers here. A target group's "job" label sets its job name.
  - job_name: local-targets
    file_sd_configs:
      - files: ["{TARGETS_FILE}"]
        refresh_interval: 1s
"""


def _start_prometheus() -> dict:
    binary = shutil.which("prometheus")
    if binary is None:
        raise StackError("prometheus not found: run deploy/local/setup.sh (Debian package prometheus)")
    port = _free_port()
    config = STATE_DIR / "prometheus.yml"
    config.write_text(_prometheus_config(port))
    if not TARGETS_FILE.exists():
        TARGETS_FILE.write_text("[]\n")
    data_dir = STATE_DIR / "prometheus-data"
    shutil.rmtree(data_dir, ignore_errors=True)
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={HOST}:{port}",
        "--web.enable-lifecycle",
        "--log.level=info",
    ]
    process = _spawn("prometheus", command)
    _wait_ready("prometheus", process, lambda: _http_ok(f"http://{HOST}:{port}/-/ready"))
    return {"pid": process.pid, "marker": str(config), "port": port}


STARTERS: dict[str, Callable[[], dict]] = {
    "kafka": _start_kafka,
    "s3": _start_s3,
    "prometheus": _start_prometheus,
}


# ---------------------------------------------------------------- public API


def start(parts: tuple[str, ...] = PARTS) -> None:
    """Start each part that is not running and return once every one is ready."""
    with _locked():
        for part in parts:
            state = _read_state(part)
            if state is not None and _process_alive(state):
                continue
            _write_state(part, STARTERS[part]())


def stop(parts: tuple[str, ...] = PARTS) -> None:
    """Stop the parts in reverse start order and forget their state."""
    with _locked():
        for part in reversed(parts):
            state = _read_state(part)
            if state is not None and _process_alive(state):
                _terminate(state["pid"])
            _state_path(part).unlink(missing_ok=True)


def stop_all() -> None:
    stop(PARTS)


def running_endpoints() -> Endpoints | None:
    """Return the endpoints when every part runs, else None."""
    states = {part: _read_state(part) for part in PARTS}
    if any(state is None or not _process_alive(state) for state in states.values()):
        return None
    return Endpoints(
        kafka_bootstrap=f"{HOST}:{states['kafka']['port']}",
        s3_endpoint=f"http://{HOST}:{states['s3']['port']}",
        prometheus_url=f"http://{HOST}:{states['prometheus']['port']}",
        targets_file=TARGETS_FILE,
    )


def ensure_running() -> Endpoints:
    """Start whatever part is not running, and return the endpoints of the stack."""
    start(PARTS)
    endpoints = running_endpoints()
    if endpoints is None:
        raise StackError(f"the stack stopped right after it started; see the logs in {LOG_DIR}")
    return endpoints


def shell_exports(endpoints: Endpoints) -> str:
    """Return `export` lines that point the worker and the AWS SDK at the stack."""
    values = {
        "CAPTION_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap,
        "CAPTION_S3_ENDPOINT_URL": endpoints.s3_endpoint,
        "CAPTION_S3_ADDRESSING_STYLE": "path",
        **AWS_DUMMY_ENV,
        "PROMETHEUS_URL": endpoints.prometheus_url,
    }
    return "".join(f"export {name}={value}\n" for name, value in values.items())


def _print_status() -> int:
    """Print one line per part and return 0 when all run, 3 otherwise."""
    all_running = True
    for part in PARTS:
        state = _read_state(part)
        if state is not None and _process_alive(state):
            print(f"{part}: running on {HOST}:{state['port']} (pid {state['pid']})")
        else:
            all_running = False
            print(f"{part}: stopped")
    print(f"logs: {LOG_DIR}")
    return 0 if all_running else 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local Kafka, S3 and Prometheus stack on 127.0.0.1.")
    parser.add_argument(
        "command",
        choices=("start", "stop", "status", "env", "kafka-jars"),
        help="start or stop every part, print their status, print `export` lines "
        "(starts the stack if needed), or copy the Kafka jars from Maven",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            start(PARTS)
            return _print_status()
        if args.command == "stop":
            stop(PARTS)
            print("stack stopped")
            return 0
        if args.command == "status":
            return _print_status()
        if args.command == "env":
            sys.stdout.write(shell_exports(ensure_running()))
            return 0
        print(f"Kafka jars in {resolve_kafka_jars()}")
        return 0
    except (StackError, subprocess.CalledProcessError) as error:
        print(f"stack.py {args.command} failed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
