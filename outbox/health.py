"""``/metrics``, ``/healthz`` and ``/readyz`` for the sidecars.

Three parts, so the HTTP side never blocks on the database:

- :class:`HealthState` — thread-safe state: the event loop's heartbeat and named check results;
- :class:`HealthMonitor` — runs on the event loop: beats every second (so a stalled loop shows)
  and runs the readiness checks (``database_check``, ``provider_check``, or your own coroutines)
  every ``interval`` seconds with a timeout;
- :class:`HealthServer` — a small stdlib HTTP server in a daemon thread, bound to
  ``127.0.0.1`` unless told otherwise, that only reads the state and the registry.

``/healthz`` (liveness) is 200 while the loop beats and no *critical* check (the database) has
been failing for longer than ``unhealthy_after`` seconds — a restart is a sensible remedy only
then. ``/readyz`` (readiness) is 200 while the loop beats and every check passes; it turns 503 at
the first failed check (database down, provider outage). Both answer a small JSON document.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

import anyio
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from outbox._logs import redact

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from outbox.metrics import BacklogSampler, Metrics, RelayMetrics

__all__ = [
    "Check",
    "CheckResult",
    "HealthMonitor",
    "HealthServer",
    "HealthState",
    "Observed",
    "database_check",
    "observe_relay",
    "provider_check",
]

log = logging.getLogger(__name__)

#: A readiness check: a coroutine function that returns normally when healthy, raises otherwise.
Check = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    #: time.monotonic() when the check last changed between ok and failing.
    since: float


def _describe(exc: BaseException) -> str:
    """Exception class and the first line of its message, short (no tracebacks, no secrets)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[:200]


class HealthState:
    """The liveness and readiness facts, written by the loop and read by the HTTP thread.

    ``expected`` names checks that must report before the process is ready (until then they
    count as failing with detail ``"not checked yet"``). ``critical`` names checks whose
    failure for longer than ``unhealthy_after`` seconds also fails liveness.
    """

    def __init__(
        self,
        *,
        stall_after: float = 30.0,
        unhealthy_after: float = 60.0,
        expected: Iterable[str] = (),
        critical: Iterable[str] = ("database",),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_after = stall_after
        self.unhealthy_after = unhealthy_after
        self.critical = frozenset(critical)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat: float | None = None
        now = clock()
        self._checks: dict[str, CheckResult] = {
            name: CheckResult(False, "not checked yet", now) for name in expected
        }

    def beat(self) -> None:
        """The loop is alive (called about every second by :class:`HealthMonitor`)."""
        with self._lock:
            self._last_beat = self._clock()

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        """Record the outcome of check ``name`` (e.g. the relay reporting a provider outage)."""
        detail = redact(detail)
        with self._lock:
            old = self._checks.get(name)
            since = old.since if old is not None and old.ok == ok else self._clock()
            self._checks[name] = CheckResult(ok, detail, since)

    def checks(self) -> dict[str, CheckResult]:
        with self._lock:
            return dict(self._checks)

    def loop_age(self) -> float | None:
        """Seconds since the last heartbeat (``None`` before the first)."""
        with self._lock:
            last = self._last_beat
        return None if last is None else self._clock() - last

    def _loop_ok(self) -> tuple[bool, dict[str, Any]]:
        age = self.loop_age()
        ok = age is not None and age <= self.stall_after
        info: dict[str, Any] = {
            "ok": ok, "age_seconds": None if age is None else round(age, 3),
        }
        if not ok:
            info["detail"] = "no heartbeat yet" if age is None else "event loop stalled"
        return ok, info

    def _check_docs(self) -> dict[str, Any]:
        now = self._clock()
        return {
            name: {"ok": r.ok, "detail": r.detail, "for_seconds": round(now - r.since, 3)}
            for name, r in sorted(self.checks().items())
        }

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(alive?, JSON-able document)."""
        loop_ok, loop = self._loop_ok()
        now = self._clock()
        dead = [
            name for name, r in self.checks().items()
            if name in self.critical and not r.ok and now - r.since > self.unhealthy_after
        ]
        ok = loop_ok and not dead
        doc: dict[str, Any] = {"status": "ok" if ok else "fail", "loop": loop}
        if dead:
            doc["failing_too_long"] = sorted(dead)
            doc["checks"] = self._check_docs()
        return ok, doc

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready?, JSON-able document)."""
        loop_ok, loop = self._loop_ok()
        checks = self._check_docs()
        ok = loop_ok and all(c["ok"] for c in checks.values())
        return ok, {"status": "ok" if ok else "fail", "loop": loop, "checks": checks}


# --------------------------------------------------------------------------------------------
# checks


def database_check(engine: Engine | AsyncEngine) -> Check:
    """A check running ``SELECT 1`` on ``engine`` (sync engines in a worker thread)."""
    import sqlalchemy as sa

    from outbox.metrics import is_async_engine

    if is_async_engine(engine):
        async_engine = engine

        async def check_async() -> None:
            async with async_engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))

        return check_async

    sync_engine = cast("Engine", engine)

    def ping() -> None:
        with sync_engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    async def check() -> None:
        # abandon_on_cancel: a hung connect must not hold the probe loop past its timeout.
        await anyio.to_thread.run_sync(ping, abandon_on_cancel=True)

    return check


def provider_check(provider: Any) -> Check:
    """A check that the provider answers: its ``ping()`` if it has one, else ``stats()``."""

    async def check() -> None:
        ping = getattr(provider, "ping", None)
        if ping is not None:
            await ping()
        else:
            await provider.stats()

    return check


class HealthMonitor:
    """Heartbeat plus periodic checks on the event loop; run :meth:`run` as a task."""

    def __init__(
        self,
        state: HealthState,
        checks: Mapping[str, Check] | None = None,
        *,
        interval: float = 2.0,
        timeout: float = 5.0,
        beat_interval: float = 1.0,
    ) -> None:
        self.state = state
        self.checks = dict(checks or {})
        self.interval = interval
        self.timeout = timeout
        self.beat_interval = beat_interval
        self._last_report: tuple[tuple[str, str], ...] = ()

    async def check_once(self) -> bool:
        """Run every check once, concurrently; record and return whether all passed."""
        results: dict[str, bool] = {}

        async def one(name: str, check: Check) -> None:
            try:
                with anyio.fail_after(self.timeout):
                    await check()
            except TimeoutError:
                self.state.set(name, False, f"timed out after {self.timeout:g}s")
                results[name] = False
            except Exception as exc:
                self.state.set(name, False, _describe(exc))
                results[name] = False
            else:
                self.state.set(name, True)
                results[name] = True

        async with anyio.create_task_group() as tg:
            for name, check in self.checks.items():
                tg.start_soon(one, name, check)
        failed = sorted(n for n, ok in results.items() if not ok)
        # Said when the picture changes (a check starts failing, fails differently, recovers),
        # with each failure's reason: a line every interval naming only the check told nothing.
        now = self.state.checks()
        report = tuple((n, now[n].detail if n in now else "") for n in failed)
        if report != self._last_report:
            if failed:
                log.warning("readiness checks failing: %s",
                            "; ".join(f"{n} ({d})" if d else n for n, d in report))
            elif self._last_report:
                log.info("readiness checks passing again")
            self._last_report = report
        return not failed

    async def _beat(self) -> None:
        while True:
            self.state.beat()
            await anyio.sleep(self.beat_interval)

    async def run(self) -> None:
        """Beat and check until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._beat)
            while True:
                await self.check_once()
                await anyio.sleep(self.interval)


# --------------------------------------------------------------------------------------------
# HTTP


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def _respond(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(HTTPStatus.OK, encoder(self.server.registry), content_type, head)
            elif path == "/healthz":
                ok, doc = self.server.state.liveness()
                self._send_json(ok, doc, head)
            elif path == "/readyz":
                ok, doc = self.server.state.readiness()
                self._send_json(ok, doc, head)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics, /healthz, /readyz\n",
                           "text/plain; charset=utf-8", head)
        except Exception:  # never kill the server thread; say what went wrong in the log
            log.exception("health endpoint %s failed", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n",
                       "text/plain; charset=utf-8", head)

    def _send_json(self, ok: bool, doc: dict[str, Any], head: bool) -> None:
        body = (json.dumps(doc, sort_keys=True) + "\n").encode()
        status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, body, "application/json", head)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], state: HealthState, registry: CollectorRegistry
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.registry = registry
        super().__init__(address, _Handler)


class HealthServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` from a daemon thread.

    ``port=0`` picks a free port (see :attr:`port`). Use as a context manager or call
    :meth:`start` / :meth:`close`.
    """

    def __init__(
        self,
        state: HealthState,
        *,
        registry: CollectorRegistry | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.state = state
        self.registry = REGISTRY if registry is None else registry
        self.host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("HealthServer is not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HealthServer:
        """Bind and serve (``OSError`` if the address is taken)."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self._requested_port), self.state, self.registry)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-health", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving and release the port. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# the relay sidecar's wiring


@dataclass
class Observed:
    """What :func:`observe_relay` set up (for tests and for embedding)."""

    metrics: Metrics
    state: HealthState
    server: HealthServer
    hooks: RelayMetrics
    sampler: BacklogSampler
    monitor: HealthMonitor


@asynccontextmanager
async def observe_relay(
    relay: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    registry: CollectorRegistry | None = None,
    backlog_interval: float = 5.0,
    check_interval: float = 2.0,
    stall_after: float = 30.0,
    unhealthy_after: float = 60.0,
) -> AsyncIterator[Observed]:
    """Serve ``/metrics``, ``/healthz``, ``/readyz`` for ``relay`` while the block runs.

    Adds :class:`~outbox.metrics.RelayMetrics` to ``relay.hooks``, samples the backlog every
    ``backlog_interval`` seconds, and checks every ``check_interval`` seconds that the database
    answers ``SELECT 1`` and the provider its ``ping``/``stats``. Ready means: those two pass and
    the relay itself reports ready (it is not during a provider outage or after a database error
    until its next successful claim). Use around ``await relay.run()``::

        async with observe_relay(relay, port=9464):
            await relay.run()
    """
    from outbox.metrics import BacklogSampler, RelayMetrics, get_metrics

    metrics = get_metrics(registry)
    state = HealthState(
        stall_after=stall_after,
        unhealthy_after=unhealthy_after,
        expected=("database", "provider", "relay"),
    )
    hooks = RelayMetrics(metrics, relay=relay, state=state)
    if getattr(getattr(relay, "stats", None), "ready", False):
        state.set("relay", True)
    relay.hooks.append(hooks)

    async def provider_ready() -> None:
        provider = getattr(relay, "provider", None)  # resolved by relay.start()
        if provider is not None:
            await provider_check(provider)()

    monitor = HealthMonitor(
        state,
        {"database": database_check(relay.engine), "provider": provider_ready},
        interval=check_interval,
    )
    sampler = BacklogSampler(relay.engine, metrics, interval=backlog_interval)
    server = HealthServer(state, registry=metrics.registry, host=host, port=port).start()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)
            tg.start_soon(sampler.run)
            yield Observed(metrics, state, server, hooks, sampler, monitor)
            tg.cancel_scope.cancel()
    finally:
        server.close()
        if hooks in relay.hooks:
            relay.hooks.remove(hooks)
