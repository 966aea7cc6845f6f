"""Real servers for the test suite: the shared ones on loopback, and private ones a test may kill.

Shared servers (PostgreSQL, Redis, NATS, MariaDB) are started before the session and in CI; each
test gets its own database / key prefix / stream. Tests that stop or restart a server use the
``Private*`` classes, which spawn a server of their own on a free port in a temp dir.

A server that is not reachable skips its tests with the reason, except when ``CI`` is set: then it
is a failure, so CI can never pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.helpers import eventually_sync

# The shared servers (docs/development.md, "Servers elsewhere"): where they are and how to log in.
PG_HOST = os.environ.get("OUTBOX_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OUTBOX_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OUTBOX_TEST_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("OUTBOX_TEST_PG_PASSWORD", "")
REDIS_HOST = os.environ.get("OUTBOX_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("OUTBOX_TEST_REDIS_PORT", "6379"))
REDIS_PASSWORD = os.environ.get("OUTBOX_TEST_REDIS_PASSWORD", "")
NATS_HOST = os.environ.get("OUTBOX_TEST_NATS_HOST", "127.0.0.1")
NATS_PORT = int(os.environ.get("OUTBOX_TEST_NATS_PORT", "4222"))
NATS_USER = os.environ.get("OUTBOX_TEST_NATS_USER", "")
NATS_PASSWORD = os.environ.get("OUTBOX_TEST_NATS_PASSWORD", "")
MARIADB_HOST = os.environ.get("OUTBOX_TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("OUTBOX_TEST_MARIADB_PORT", "3306"))
MARIADB_USER = os.environ.get("OUTBOX_TEST_MARIADB_USER", "root")
MARIADB_PASSWORD = os.environ.get("OUTBOX_TEST_MARIADB_PASSWORD", "")


def _login(user: str, password: str) -> str:
    """``user[:password]@`` for a URL (quoted), or nothing without a user and password."""
    if not user and not password:
        return ""
    return f"{quote(user, safe='')}{':' + quote(password, safe='') if password else ''}@"


def pg_url(database: str, driver: str = "psycopg") -> str:
    """A URL of ``database`` on the shared PostgreSQL."""
    return f"postgresql+{driver}://{_login(PG_USER, PG_PASSWORD)}{PG_HOST}:{PG_PORT}/{database}"


def mariadb_url(database: str) -> str:
    """A URL of ``database`` on the shared MariaDB."""
    return (f"mysql+pymysql://{_login(MARIADB_USER, MARIADB_PASSWORD)}{MARIADB_HOST}:"
            f"{MARIADB_PORT}/{database}")


def redis_url() -> str:
    """The shared Redis, database 0."""
    return f"redis://{_login('', REDIS_PASSWORD)}{REDIS_HOST}:{REDIS_PORT}/0"


def nats_url() -> str:
    """The shared NATS server."""
    return f"nats://{_login(NATS_USER, NATS_PASSWORD)}{NATS_HOST}:{NATS_PORT}"

IN_CI = bool(os.environ.get("CI"))


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    """Skip (or, under CI, fail) when the server is not reachable."""
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI is set: unreachable servers fail the run)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    eventually_sync(lambda: reachable(host, port, 0.2), within=timeout, every=0.05,
                    what=f"a server listening on {host}:{port}")


def wait_for_port_closed(host: str, port: int, timeout: float = 20.0) -> None:
    eventually_sync(lambda: not reachable(host, port, 0.2), within=timeout, every=0.05,
                    what=f"{host}:{port} to stop accepting")


def _require_binary(name: str) -> str:
    sbin = f"/usr/sbin/{name}"
    path = shutil.which(name) or (sbin if os.path.exists(sbin) else None)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (needed for private-server tests)")
        pytest.skip(f"{name} is not installed")
    return path


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, on a free port. ``stop``/``start`` keep the port.

    ``args`` are appended to the command line (later options win: ``("--appendonly", "yes")``
    makes a server that keeps its data across ``stop``/``start``).
    """

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.binary = _require_binary("redis-server")
        self.port = self.port or free_port()
        self.dir = tempfile.mkdtemp(prefix="outbox-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            wait_for_port_closed("127.0.0.1", self.port)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PrivateNats:
    """A nats-server with JetStream (file store in a temp dir) on a free port.

    ``args`` are appended to the command line (e.g. ``("--auth", "TOKEN")``).
    """

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.binary = _require_binary("nats-server")
        self.port = self.port or free_port()
        self.dir = tempfile.mkdtemp(prefix="outbox-nats-")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.dir,
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
            wait_for_port_closed("127.0.0.1", self.port)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb in a temp dir, run as user postgres)."""

    port: int = 0

    def __post_init__(self) -> None:
        bindir = Path("/usr/lib/postgresql")
        versions = sorted(bindir.glob("*/bin/initdb")) if bindir.exists() else []
        if not versions:
            if IN_CI:
                pytest.fail("PostgreSQL server binaries not found (needed for private clusters)")
            pytest.skip("PostgreSQL server binaries not found")
        self.bin = versions[-1].parent
        self.port = self.port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-pg-"))
        self.data = self.dir / "data"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                   "--no-sync"])

    def _run(self, args: list[str]) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if self._as_postgres else args
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       cwd=self.dir)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                "-c max_connections=50")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-l",
                   str(self.dir / "log"), "start"])
        wait_for_port("127.0.0.1", self.port)

    def stop(self, mode: str = "immediate") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PrivatePgBouncer:
    """A pgbouncer of the test's own in transaction pooling, in front of the shared PostgreSQL
    (trust authentication, user postgres), on a free port. ``pool_size`` server connections
    per database; ``stats()`` reads its SHOW STATS (admin console)."""

    port: int = 0
    pool_size: int = 10
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.binary = _require_binary("pgbouncer")
        self.port = self.port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
        (self.dir / "users.txt").write_text(f'"{PG_USER}" "{PG_PASSWORD}"\n')
        (self.dir / "pgbouncer.ini").write_text(f"""
[databases]
* = host={PG_HOST} port={PG_PORT}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir}/users.txt
admin_users = {PG_USER}
pool_mode = transaction
default_pool_size = {self.pool_size}
max_client_conn = 400
logfile = {self.dir}/pgbouncer.log
pidfile = {self.dir}/pgbouncer.pid
""")
        # pgbouncer refuses to run as root: run it as the PostgreSQL server's user.
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.dir, self._user, self._user)
            for child in self.dir.iterdir():
                shutil.chown(child, self._user, self._user)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{_login(PG_USER, PG_PASSWORD)}127.0.0.1:{self.port}/" \
            f"{database}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, str(self.dir / "pgbouncer.ini")], user=self._user,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class PrivateNatsCluster:
    """Three nats-servers with JetStream, routed into one cluster on free loopback ports.
    ``servers[i].stop()``/``start()`` kill (SIGKILL) and restart one, keeping its store."""

    size: int = 3
    servers: list[PrivateNats] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
        self.servers = [
            PrivateNats(args=("--server_name", f"n{i}", "--cluster_name", "outbox-test",
                              "--cluster", f"nats://127.0.0.1:{port}", "--routes", routes))
            for i, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        return ",".join(server.url for server in self.servers)

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def close(self) -> None:
        for server in self.servers:
            server.close()
