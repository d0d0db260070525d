"""Runs a real single-node KRaft broker on loopback for dev, tests and `avatar up`.

Jars come from Maven Central via infra/kafka/pom.xml (cached outside the repo); no docker.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

__all__ = [
    "BrokerError",
    "BrokerSettings",
    "BrokerStatus",
    "default_lib_dir",
    "fetch_jars",
    "kill",
    "log_tail",
    "restart",
    "server_properties",
    "start",
    "status",
    "stop",
]

_log = logging.getLogger(__name__)
# librdkafka's own log lines (connection refused while the broker boots, ...): silent unless
# the application configures logging
_rdkafka_log = logging.getLogger(__name__ + ".librdkafka")
_rdkafka_log.addHandler(logging.NullHandler())

HOST: Final = "127.0.0.1"  # loopback only: the dev broker is never reachable from the network
INFRA_DIR: Final = Path(__file__).resolve().parent.parent / "infra" / "kafka"
DEFAULT_POM: Final = INFRA_DIR / "pom.xml"
DEFAULT_LOG4J: Final = INFRA_DIR / "log4j2.properties"
DEFAULT_PORT: Final = 19092  # 9092 + 10000: never clashes with a "real" Kafka on 9092
DEFAULT_CONTROLLER_PORT: Final = 19093  # the KRaft controller listener, next to the broker port

_MARKER: Final = ".complete"  # written into lib_dir only after maven succeeded
_FETCH_TIMEOUT_S: Final = 900.0  # a cold fetch is ~45 MB; 15 min covers a slow mirror
_FORMAT_TIMEOUT_S: Final = 120.0  # StorageTool is one short JVM run (~2 s); generous for a loaded CI box
_KILL_WAIT_S: Final = 10.0  # after SIGKILL the kernel frees the process almost at once
_POLL_S: Final = 0.2  # readiness / exit polling interval: cheap, and adds at most 0.2 s
_LOG_TAIL_LINES: Final = 40


class BrokerError(RuntimeError):
    """The broker could not be fetched, formatted, started or stopped."""


@dataclasses.dataclass(frozen=True)
class BrokerSettings:
    """Where and how the local broker runs. Pure data; use `from_env()` for the defaults."""

    home: Path  # data dir: server.properties, data/ (log.dirs), broker.log, broker.pid
    lib_dir: Path  # the jars fetched by maven (shared between homes)
    port: int = DEFAULT_PORT
    controller_port: int = DEFAULT_CONTROLLER_PORT
    heap_min_mb: int = 256  # -Xms: what an idle single-node broker actually uses
    heap_max_mb: int = 512  # -Xmx: leaves room for the avatar pipeline on a 2-core dev box
    java: str = "java"
    mvn: str = "mvn"
    pom: Path = DEFAULT_POM
    log4j_config: Path = DEFAULT_LOG4J

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BrokerSettings:
        """Defaults, overridden by AVATAR_KAFKA_HOME / _PORT / _CONTROLLER_PORT / _LIB, JAVA_HOME.

        Reads pom.xml (to key the default lib dir by its hash).
        """
        e = os.environ if env is None else env
        cache = Path.home() / ".cache" / "avatar-backbone"
        home_env, lib_env = e.get("AVATAR_KAFKA_HOME"), e.get("AVATAR_KAFKA_LIB")
        home = Path(home_env).expanduser().absolute() if home_env else cache / "kafka"
        lib = Path(lib_env).expanduser().absolute() if lib_env else default_lib_dir()
        java_home = e.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else "java"
        return cls(
            home=home,
            lib_dir=lib,
            port=_env_port(e, "AVATAR_KAFKA_PORT", DEFAULT_PORT),
            controller_port=_env_port(e, "AVATAR_KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT),
            java=java,
        )

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def properties_file(self) -> Path:
        return self.home / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"


@dataclasses.dataclass(frozen=True)
class BrokerStatus:
    running: bool  # our broker process (pid file) is alive
    pid: int | None
    bootstrap: str
    answering: bool  # it answered a metadata request with this home's cluster id


def default_lib_dir(pom: Path = DEFAULT_POM) -> Path:
    """~/.cache/avatar-backbone/kafka-lib-<first 12 hex of sha256(pom.xml)>."""
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    return Path.home() / ".cache" / "avatar-backbone" / f"kafka-lib-{digest}"


def _absolute(settings: BrokerSettings) -> BrokerSettings:
    """Relative paths made absolute: the JVM runs with cwd=home and /proc cmdlines must match."""
    return dataclasses.replace(
        settings,
        home=settings.home.absolute(),
        lib_dir=settings.lib_dir.absolute(),
        pom=settings.pom.absolute(),
        log4j_config=settings.log4j_config.absolute(),
    )


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{name}={raw!r} is not a port number")
    return port


# ---------------------------------------------------------------------------------- jars


def fetch_jars(settings: BrokerSettings) -> Path:
    """Run maven into settings.lib_dir unless a previous fetch completed; returns lib_dir.

    The jars land in a temp dir next to lib_dir that is renamed into place only after
    maven succeeded, so an interrupted download is simply redone on the next call.
    """
    settings = _absolute(settings)
    lib = settings.lib_dir
    if (lib / _MARKER).is_file():
        return lib
    mvn = shutil.which(settings.mvn)
    if mvn is None:
        raise BrokerError(f"{settings.mvn!r} not found on PATH: install Maven (Debian package: maven)")
    if not settings.pom.is_file():
        raise BrokerError(f"{settings.pom} not found")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with _flock(lib.parent / f".{lib.name}.lock"):
        if (lib / _MARKER).is_file():  # another process fetched while we waited
            return lib
        _remove_partials(lib)
        tmp = Path(tempfile.mkdtemp(prefix=f".{lib.name}.partial-", dir=lib.parent))
        try:
            started = time.monotonic()
            cmd = [
                mvn, "-B", "-q", "-f", str(settings.pom), "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}", "-DincludeScope=runtime",
            ]
            _log.info("fetching kafka jars: %s", " ".join(cmd))
            try:
                done = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                    timeout=_FETCH_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                raise BrokerError(f"maven did not finish within {_FETCH_TIMEOUT_S:.0f} s") from None
            if done.returncode != 0:
                output = _tail(done.stdout + done.stderr)
                raise BrokerError(f"maven failed (exit {done.returncode}):\n{output}")
            jars = sorted(p.name for p in tmp.glob("*.jar"))
            if not any(name.startswith("kafka_2.13-") for name in jars):
                raise BrokerError(f"maven succeeded but no kafka_2.13 jar in {tmp}: {jars}")
            (tmp / _MARKER).write_text("\n".join(jars) + "\n")
            if lib.exists():  # leftover of an older, incomplete layout
                shutil.rmtree(lib)
            tmp.rename(lib)
            _log.info("fetched %d jars into %s in %.1f s", len(jars), lib, time.monotonic() - started)
        finally:
            _remove_partials(lib)  # ours unless renamed, plus any left by a killed fetch
    return lib


def _remove_partials(lib: Path) -> None:
    for partial in lib.parent.glob(f".{lib.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------------------- config


def server_properties(settings: BrokerSettings) -> str:
    """The broker's server.properties: single-node KRaft (broker+controller) on loopback."""
    s = settings
    return f"""\
# Generated by backbone/broker.py on every start; edits are overwritten.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{HOST}:{s.controller_port}
listeners=PLAINTEXT://{HOST}:{s.port},CONTROLLER://{HOST}:{s.controller_port}
advertised.listeners=PLAINTEXT://{HOST}:{s.port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={s.data_dir}

# one node: every replication factor / min ISR is 1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# 1 partition instead of 50 for internal topics: nothing to spread on one node, and creating
# 50 partitions delays the first consumer-group join (keep constant once data exists)
offsets.topic.num.partitions=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.num.partitions=1

# consumers join at once instead of waiting 3 s for more members
group.initial.rebalance.delay.ms=0
# stage consumers may ask for a 1 s session (fail-over within 2 s after a crash); the 6 s
# default minimum would refuse them
group.min.session.timeout.ms=500
# topics are provisioned by the project, a typo must not create one
auto.create.topics.enable=false

# A restarted broker's registration is refused (DUPLICATE_BROKER_REGISTRATION) until the
# controller's in-memory session for its previous incarnation expires, even after a clean
# shutdown: with the 9 s default a restart takes ~14 s. 3 s session / 0.5 s heartbeat make it
# ~5 s; a JVM stalled > 3 s gets fenced and unfenced again on its next heartbeat.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500

# sized for a 2-core dev box
num.network.threads=2
num.io.threads=2
background.threads=2
# the 128 MiB default is allocated on the heap
log.cleaner.dedupe.buffer.size=16777216
"""


def _jvm_flags(settings: BrokerSettings) -> list[str]:
    return [
        f"-Xms{settings.heap_min_mb}m",
        f"-Xmx{settings.heap_max_mb}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",  # kafka-server-start.sh's default: short pauses over throughput
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={settings.log4j_config}",
    ]


def _classpath(lib: Path) -> str:
    return f"{lib}/*"  # expanded by the JVM itself, no shell involved


# ------------------------------------------------------------------------------ process

# Broker processes started by this Python process: polled so they are reaped (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _children[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie: dead, waiting for its parent
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _is_our_broker(pid: int, settings: BrokerSettings) -> bool:
    """The pid is alive and (where /proc tells) runs kafka.Kafka with this home's config."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # with procfs the pid is gone; without, trust kill(0)
    except OSError:
        return True
    return b"kafka.Kafka" in cmdline and str(settings.properties_file).encode() in cmdline


def _read_pid(settings: BrokerSettings) -> int | None:
    try:
        return int(settings.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _running_pid(settings: BrokerSettings) -> int | None:
    pid = _read_pid(settings)
    if pid is not None and _is_our_broker(pid, settings):
        return pid
    return None


def _port_taken(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def _cluster_id(settings: BrokerSettings) -> str | None:
    try:
        text = (settings.data_dir / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "cluster.id":
            return value.strip()
    return None


def _new_cluster_id() -> str:
    """Same format as Kafka's Uuid.randomUuid(): 16 random bytes, url-safe base64, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):  # Kafka rejects these too (they look like CLI flags)
            return cid


def _answers(settings: BrokerSettings, timeout_s: float, cluster_id: str | None) -> bool:
    """A metadata request to the broker port succeeds (and names this home's cluster)."""
    if not _port_taken(settings.port):  # avoids librdkafka's connect-refused retry loop
        return False
    admin = AdminClient(
        {"bootstrap.servers": settings.bootstrap, "socket.connection.setup.timeout.ms": 2000},
        logger=_rdkafka_log,
    )
    try:
        meta = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    if not meta.brokers:
        return False
    return cluster_id is None or meta.cluster_id == cluster_id


def log_tail(settings: BrokerSettings, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of the broker log (stdout+stderr of the JVM), or a note if there is none."""
    try:
        with settings.log_file.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"(no broker log at {settings.log_file})"
    return _tail(text, lines) or f"(broker log {settings.log_file} is empty)"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent start/stop calls on one home serialize."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _java_missing(settings: BrokerSettings) -> BrokerError:
    return BrokerError(
        f"{settings.java!r} not found: install Java 17+ (Debian package: openjdk-17-jre-headless)"
    )


def _format_storage(settings: BrokerSettings, lib: Path) -> str:
    cluster_id = _new_cluster_id()
    cmd = [
        settings.java, "-Xmx256m", f"-Dlog4j2.configurationFile={settings.log4j_config}",
        "-cp", _classpath(lib), "kafka.tools.StorageTool",
        "format", "-t", cluster_id, "-c", str(settings.properties_file), "--ignore-formatted",
    ]
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_FORMAT_TIMEOUT_S
        )
    except FileNotFoundError:
        raise _java_missing(settings) from None
    except subprocess.TimeoutExpired:
        raise BrokerError(f"kafka StorageTool did not finish within {_FORMAT_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        output = _tail(done.stdout + done.stderr)
        raise BrokerError(f"formatting {settings.data_dir} failed (exit {done.returncode}):\n{output}")
    found = _cluster_id(settings)
    if found is None:
        output = _tail(done.stdout)
        raise BrokerError(f"StorageTool wrote no meta.properties in {settings.data_dir}:\n{output}")
    return found


def _wait_ready(settings: BrokerSettings, pid: int, cluster_id: str | None, deadline: float) -> None:
    while True:
        if not _alive(pid):
            settings.pid_file.unlink(missing_ok=True)
            raise BrokerError(
                f"kafka broker (pid {pid}) exited during startup; {settings.log_file}:\n{log_tail(settings)}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if _answers(settings, min(2.0, max(remaining, 0.1)), cluster_id):
            return
        time.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
    raise BrokerError(
        f"kafka broker (pid {pid}) not answering on {settings.bootstrap} in time; "
        f"{settings.log_file}:\n{log_tail(settings)}"
    )


# ----------------------------------------------------------------------------- public ops


def start(settings: BrokerSettings, timeout_s: float = 90.0) -> str:
    """Start the broker (fetching jars / formatting storage if needed); returns "127.0.0.1:PORT".

    Idempotent: if this home's broker is already running it only waits until it answers.
    Data and cluster id in home/data are kept across stop()/start(). Raises BrokerError
    (with the tail of the broker log) if the broker exits or does not answer in time.
    """
    deadline = time.monotonic() + timeout_s
    settings = _absolute(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    with _flock(settings.home / ".lock"):
        pid = _running_pid(settings)
        if pid is not None:
            _wait_ready(settings, pid, _cluster_id(settings), deadline)
            return settings.bootstrap
        settings.pid_file.unlink(missing_ok=True)  # stale
        for port in (settings.port, settings.controller_port):
            if _port_taken(port):
                raise BrokerError(
                    f"{HOST}:{port} is already in use by another process (another broker? "
                    "set AVATAR_KAFKA_PORT / AVATAR_KAFKA_CONTROLLER_PORT)"
                )
        lib = fetch_jars(settings)
        settings.properties_file.write_text(server_properties(settings))
        cluster_id = _cluster_id(settings) or _format_storage(settings, lib)

        if settings.log_file.exists():
            settings.log_file.replace(settings.log_file.with_name(settings.log_file.name + ".1"))
        cmd = [
            settings.java, *_jvm_flags(settings),
            "-cp", _classpath(lib), "kafka.Kafka", str(settings.properties_file),
        ]
        launched = time.monotonic()
        with settings.log_file.open("wb") as log:
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=settings.home, start_new_session=True, close_fds=True,
                )
            except FileNotFoundError:
                raise _java_missing(settings) from None
        _children[proc.pid] = proc
        pid_tmp = settings.pid_file.with_suffix(".pid.tmp")
        pid_tmp.write_text(f"{proc.pid}\n")
        pid_tmp.replace(settings.pid_file)
        try:
            _wait_ready(settings, proc.pid, cluster_id, deadline)
        except BrokerError:
            # leave no half-started broker behind
            _signal_and_wait(settings, proc.pid, signal.SIGKILL, _KILL_WAIT_S)
            raise
        took = time.monotonic() - launched
        _log.info("kafka broker pid %d ready on %s in %.1f s", proc.pid, settings.bootstrap, took)
        return settings.bootstrap


def _signal_and_wait(settings: BrokerSettings, pid: int, sig: signal.Signals, timeout_s: float) -> bool:
    """Send sig and wait until the process is gone; True if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    settings.pid_file.unlink(missing_ok=True)
    return True


def stop(settings: BrokerSettings, timeout_s: float = 30.0) -> bool:
    """Stop this home's broker: SIGTERM (clean shutdown, logs flushed), SIGKILL after timeout_s.

    Returns True if a broker was running, False if there was nothing to stop (idempotent).
    """
    settings = _absolute(settings)
    if not settings.home.is_dir():
        return False
    with _flock(settings.home / ".lock"):
        pid = _running_pid(settings)
        if pid is None:
            settings.pid_file.unlink(missing_ok=True)
            return False
        if not _signal_and_wait(settings, pid, signal.SIGTERM, timeout_s):
            _log.warning("kafka broker pid %d ignored SIGTERM for %.0f s; SIGKILL", pid, timeout_s)
            if not _signal_and_wait(settings, pid, signal.SIGKILL, _KILL_WAIT_S):
                raise BrokerError(f"kafka broker pid {pid} survived SIGKILL")
        return True


def restart(settings: BrokerSettings, timeout_s: float = 90.0) -> str:
    """Stop this home's broker cleanly and start it again on the same log dir and ports
    (fault tests: a broker restart under a live session); returns the bootstrap address."""
    stop(settings)
    return start(settings, timeout_s)


def kill(settings: BrokerSettings) -> bool:
    """SIGKILL this home's broker at once (crash tests); True if one was running."""
    settings = _absolute(settings)
    if not settings.home.is_dir():
        return False
    with _flock(settings.home / ".lock"):
        pid = _running_pid(settings)
        if pid is None:
            settings.pid_file.unlink(missing_ok=True)
            return False
        if not _signal_and_wait(settings, pid, signal.SIGKILL, _KILL_WAIT_S):
            raise BrokerError(f"kafka broker pid {pid} survived SIGKILL")
        return True


def status(settings: BrokerSettings, timeout_s: float = 2.0) -> BrokerStatus:
    """Whether this home's broker process is alive and whether it answers a metadata request."""
    settings = _absolute(settings)
    pid = _running_pid(settings)
    answering = pid is not None and _answers(settings, timeout_s, _cluster_id(settings))
    return BrokerStatus(
        running=pid is not None, pid=pid, bootstrap=settings.bootstrap, answering=answering
    )
