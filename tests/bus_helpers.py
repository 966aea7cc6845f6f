"""Helpers for tests that run ``python -m outbox.consume`` processes against Redis / NATS.

:data:`APP_SOURCE` is an ``--app`` module: its handler appends the event id to
``$OUT_DIR/<group>-<pid>.out``. Payload switches: ``{"sleep": s}`` writes ``started-<id>`` and
sleeps ``s`` seconds first; ``{"hang": true}`` makes the first process of group ``$HANG_GROUP``
that sees it write ``hung-<id>`` (its pid) and hang until killed; ``{"fail": true}`` raises.
With ``$INBOX`` set the handler also inserts into ``test_effects`` through the inbox session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import eventually, eventually_sync

ROOT = Path(__file__).resolve().parents[1]

APP_SOURCE = '''
import os, pathlib, time
import outbox

OUT = pathlib.Path(os.environ["OUT_DIR"])
GROUP = os.environ.get("GROUP", "g")


@outbox.subscribe("*")
def record(event):
    payload = event.payload if isinstance(event.payload, dict) else {}
    if payload.get("sleep"):
        (OUT / f"started-{event.id}").write_text(str(os.getpid()))
        time.sleep(payload["sleep"])
    if payload.get("hang") and GROUP == os.environ.get("HANG_GROUP"):
        try:
            fd = os.open(OUT / f"hung-{event.id}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(3600)
    if payload.get("fail"):
        raise RuntimeError("asked to fail")
    if os.environ.get("INBOX"):
        import sqlalchemy as sa
        from outbox.inbox import current_session
        current_session().execute(
            sa.text("INSERT INTO test_effects (event_id, note) VALUES (:id, :note)"),
            {"id": event.id, "note": GROUP})
    with open(OUT / f"{GROUP}-{os.getpid()}.out", "a") as out:
        out.write(f"{event.id}\\n")
'''


def write_app(directory: Path, name: str = "consume_app") -> str:
    (directory / f"{name}.py").write_text(APP_SOURCE)
    return name


def write_config(directory: Path, *, provider: str, redis_url: str | None = None,
                 stream: str | None = None, nats_url: str | None = None,
                 subject_prefix: str | None = None, claim_idle: float = 2.0,
                 retry: str = "{max_retries: 1, initial_delay: 0.1, max_delay: 0.2}") -> Path:
    lines = ["event_broker:", f"  provider: {provider}", f"  retry_policy: {retry}"]
    if provider == "redis":
        lines += ["  redis:", f"    url: {redis_url}", f"    stream_name: '{stream}'",
                  f"    claim_idle: {claim_idle}", "    max_len: 1000000"]
    else:
        lines += ["  nats:", f"    url: {nats_url}", f"    stream_name: '{stream}'",
                  f"    subject_prefix: '{subject_prefix}'", f"    claim_idle: {claim_idle}"]
    path = directory / "outbox.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ConsumerProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    group: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until it logs that it consumes (its group exists then)."""

        def ready() -> bool:
            text = self.log.read_text() if self.log.exists() else ""
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer exited {self.proc.returncode}: {text}")
            return "consuming group" in text

        eventually_sync(ready, within=timeout, every=0.05,
                        what=lambda: f"the consumer to be ready: {self.log.read_text()}")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_consumer(directory: Path, config: Path, group: str, *, provider: str,
                   extra: Sequence[str] = (), env: dict[str, str] | None = None,
                   name: str | None = None) -> ConsumerProcess:
    log = directory / f"{name or group}-{time.monotonic_ns()}.log"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT_DIR": str(directory), "GROUP": group,
                **(env or {})}
    full_env.pop("OUTBOX_CONFIG", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "outbox.consume", "--provider", provider, "--group", group,
             "--app", "consume_app", "--config", str(config), "--log-level", "INFO", *extra],
            cwd=directory, env=full_env, stdout=subprocess.DEVNULL, stderr=err,
        )
    return ConsumerProcess(proc, log, group)


def handled(directory: Path, group: str) -> dict[int, list[str]]:
    """Event ids each process of ``group`` handled, by pid."""
    out: dict[int, list[str]] = {}
    for path in directory.glob(f"{group}-*.out"):
        pid = int(path.stem.rsplit("-", 1)[1])
        out[pid] = [line for line in path.read_text().splitlines() if line]
    return out


# -- relay → bus scenarios (tests/integration/test_redis_relay.py, test_nats_relay.py) ----------


def commit_events(engine: Any, n: int, *, hang: int = 0, full: bool = True) -> list[Any]:
    """Commit ``n`` events (plus ``hang`` that hang group $HANG_GROUP) in one transaction."""
    from sqlalchemy.orm import Session

    import outbox

    events = []
    for i in range(n + hang):
        extra: dict[str, Any] = {}
        if full:
            extra = dict(user_id=f"u{i % 7}", session_id=f"s{i % 3}", schema_name="public",
                         entity="users", entity_id=str(i), operation="update",
                         ordering_key=f"public.users:{i % 5}",
                         metadata={"changes": {"name": {"old": "a", "new": "b"}},
                                   "traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                                  "b7ad6b7169203331-01"})
        payload = {"i": i, "name": f"user {i}"}
        if i >= n:
            payload["hang"] = True
        events.append(outbox.new_event(source="database", type="public.users.update",
                                       payload=payload, **extra))
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add_all(events)
    return events


def event_rows(engine: Any) -> dict[str, dict[str, Any]]:
    """Every events row as ``to_dict()``, by id."""
    import sqlalchemy as sa

    import outbox

    with engine.connect() as conn:
        rows = conn.execute(sa.select(outbox.Event.__table__)).mappings().all()
    return {str(r["id"]): dict(r) for r in rows}


def check_with_cloudevents_sdk(documents: Sequence[bytes], rows: dict[str, dict[str, Any]]
                               ) -> None:
    """Parse each document with the public cloudevents SDK; every carried field matches."""
    import json as _json

    from cloudevents.core.formats.json import JSONFormat

    assert len({_json.loads(d)["id"] for d in documents}) == len(rows)
    for document in documents:
        ce = JSONFormat().read(None, document)
        attrs = ce.get_attributes()
        row = rows[attrs["id"]]
        assert attrs["specversion"] == "1.0"
        assert attrs["source"] == f"/outbox/{row['instance_id']}/{row['source']}"
        assert attrs["type"] == row["type"]
        assert attrs["time"] == row["created_at"]
        assert attrs["datacontenttype"] == "application/json"
        assert ce.get_data() == row["payload"]
        assert int(attrs["sequence"]) == row["seq"]
        for attr, column in (("userid", "user_id"), ("sessionid", "session_id"),
                             ("schemaname", "schema_name"), ("entity", "entity"),
                             ("entityid", "entity_id"), ("operation", "operation"),
                             ("partitionkey", "ordering_key")):
            assert attrs.get(attr) == row[column], attr
        assert _json.loads(attrs["metadata"]) == row["metadata"]
        assert attrs["traceparent"] == row["metadata"]["traceparent"]


async def relay_once(url: str, provider: Any) -> Any:
    """Run a relay over ``url`` until nothing is due, forwarding to ``provider``."""
    import outbox
    from outbox.providers.memory import MemoryProvider
    from outbox.relay import Relay

    broker = outbox.Broker(MemoryProvider(), sync_handlers="inline")
    relay = Relay(url, broker=broker, provider=provider, notify=False, poll_interval=0.1,
                  batch_size=200)
    await relay.run(once=True)
    return relay


def statuses(engine: Any) -> dict[str, int]:
    import sqlalchemy as sa

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM events GROUP BY status")).all()
    return {status: int(n) for status, n in rows}


def max_retry_count(engine: Any) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT coalesce(max(retry_count), 0) FROM events"))
                   .scalar_one())


def fanout_scenario(directory: Path, config: Path, provider_name: str, engine: Any,
                    url: str, make_provider: Any, read_documents: Any) -> None:
    """Relay → bus → two groups: each group gets every event once, two members of one group
    split the events, a member killed mid-handler leaves its event to the other member; the
    documents on the bus parse with the cloudevents SDK, fields intact; forwarding everything a
    second time adds nothing to the bus."""
    import anyio

    write_app(directory)
    env = {"HANG_GROUP": "a"}
    a1 = start_consumer(directory, config, "a", provider=provider_name, env=env, name="a1")
    a2 = start_consumer(directory, config, "a", provider=provider_name, env=env, name="a2")
    b1 = start_consumer(directory, config, "b", provider=provider_name, env=env, name="b1")
    consumers = [a1, a2, b1]
    try:
        for c in consumers:
            c.wait_ready()
        events = commit_events(engine, 200, hang=1)
        ids = {str(e.id) for e in events}
        hang_id = str(events[-1].id)

        async def forward() -> None:
            provider = make_provider()
            try:
                await relay_once(url, provider)
            finally:
                await provider.close()

        anyio.run(forward)
        assert statuses(engine) == {"completed": 201}

        def group_ids(group: str) -> list[str]:
            return [i for done in handled(directory, group).values() for i in done]

        eventually_sync(lambda: len(group_ids("b")) >= 201, what="group b got every event")
        eventually_sync(lambda: (directory / f"hung-{hang_id}").exists(), what="a member hanging")
        eventually_sync(lambda: len(group_ids("a")) >= 200, what="group a got the other events")
        hung_pid = int((directory / f"hung-{hang_id}").read_text())
        victim = next(c for c in (a1, a2) if c.pid == hung_pid)
        survivor = a2 if victim is a1 else a1
        victim.kill()  # mid-handler: its entry was never acknowledged
        eventually_sync(lambda: hang_id in handled(directory, "a").get(survivor.pid, []), within=60,
                 what="the survivor took over the killed member's event")
        eventually_sync(lambda: len(group_ids("a")) >= 201, what="group a complete")
        by_member = handled(directory, "a")
        assert len(by_member.get(a1.pid, [])) > 0 and len(by_member.get(a2.pid, [])) > 0, \
            "both members of group a had a share"
        assert sorted(group_ids("a")) == sorted(ids), "group a: every event exactly once"
        assert sorted(group_ids("b")) == sorted(ids), "group b: every event exactly once"
        for c in (survivor, b1):
            assert c.terminate() == 0, c.log.read_text()
    finally:
        for c in consumers:
            c.kill()

    rows = event_rows(engine)
    documents = anyio.run(read_documents)
    check_with_cloudevents_sdk(documents, rows)

    # The relay forwarding the same events again (a retry after a lost ack) adds nothing.
    import sqlalchemy as sa

    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE events SET status = 'pending', next_attempt_at = "
                             "created_at, lease_owner = NULL, lease_token = NULL, "
                             "lease_expires_at = NULL"))

    async def forward_again() -> None:
        provider = make_provider()
        try:
            await relay_once(url, provider)
        finally:
            await provider.close()

    anyio.run(forward_again)
    assert statuses(engine) == {"completed": 201}
    assert len(anyio.run(read_documents)) == 201


def outage_scenario(engine: Any, url: str, server: Any, make_provider: Any,
                    read_ids: Any, n: int = 10_000, outage: float = 15.0) -> None:
    """Stop the bus while the relay forwards ``n`` events, restart it after ``outage`` seconds:
    every event arrives, none is failed or charged a retry, duplicates carry the same id."""
    import anyio

    # Half before the relay starts; the other half while the server is down, so the relay has
    # events in hand during the whole outage however fast it forwarded the first half.
    events = commit_events(engine, n // 2, full=False)
    ids = {str(e.id) for e in events}

    async def scenario() -> None:
        import outbox
        from outbox.providers.memory import MemoryProvider
        from outbox.relay import Relay

        provider = make_provider()
        broker = outbox.Broker(MemoryProvider(), sync_handlers="inline")
        relay = Relay(url, broker=broker, provider=provider, notify=False, poll_interval=0.2,
                      batch_size=200)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(relay.run)
                await _wait_until(lambda: statuses(engine).get("completed", 0) >= n // 10,
                                  120, "the relay to forward the first tenth", engine, relay)
                server.stop()
                down_at = statuses(engine).get("completed", 0)
                more = await anyio.to_thread.run_sync(
                    lambda: commit_events(engine, n - n // 2, full=False))
                ids.update(str(e.id) for e in more)
                await anyio.sleep(outage)
                assert statuses(engine).get("failed", 0) == 0, statuses(engine)
                assert relay.stats.outages >= 1, (
                    f"no outage seen: the relay had forwarded {down_at} of {n} when the server "
                    f"stopped; {relay.stats}")
                server.start()
                await _wait_until(lambda: statuses(engine).get("completed", 0) >= n, 180,
                                  "every event after the restart", engine, relay)
                relay.stop()
        finally:
            await provider.close()

    anyio.run(scenario)
    assert statuses(engine) == {"completed": n}
    assert max_retry_count(engine) == 0, "an outage is not an event failure"
    arrived = anyio.run(read_ids)
    assert set(arrived) == ids, f"{len(ids - set(arrived))} events missing on the bus"


# -- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(directory: Path) -> Certificates:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    import shutil

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=outbox-test-ca")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=outbox-client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", subject)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", *extra)
    return Certificates(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                        directory / "client.crt", directory / "client.key")


async def _wait_until(condition: Any, seconds: float, what: str, engine: Any, relay: Any) -> None:
    await eventually(condition, within=seconds,
                     what=lambda: f"{what}: statuses {statuses(engine)}, relay {relay.stats}")
