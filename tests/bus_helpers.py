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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text() if self.log.exists() else ""
            if "consuming group" in text:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"consumer exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        raise AssertionError(f"consumer not ready after {timeout}s: {self.log.read_text()}")

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


def wait_for(condition: object, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
