"""``python -m outbox console`` in a subprocess, for the acceptance tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.helpers import eventually_sync


@contextmanager
def outbox_database() -> Iterator[str]:
    """A fresh PostgreSQL database with the outbox schema (dropped afterwards)."""
    import sqlalchemy as sa

    import outbox
    from tests.conftest import new_pg_database

    with new_pg_database() as url:
        engine = sa.create_engine(url)
        outbox.create_schema(engine)
        engine.dispose()
        yield url


@dataclass
class ConsoleProcess:
    url: str
    process: subprocess.Popen[str]
    banner: str


def console_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update(extra or {})
    return env


def run_console(*args: str, env: dict[str, str] | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the command to its end (for start-up refusals)."""
    return subprocess.run([sys.executable, "-m", "outbox", *args], env=console_env(env),
                          capture_output=True, text=True, timeout=timeout)


@contextmanager
def console(*args: str, env: dict[str, str] | None = None,
            timeout: float = 30) -> Iterator[ConsoleProcess]:
    """Start ``python -m outbox ARGS`` (a console on port 0), yield its URL once it listens,
    then stop it with SIGTERM and check it exited 0."""
    proc = subprocess.Popen([sys.executable, "-m", "outbox", *args], env=console_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.append(proc.stdout.readline())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    banner = lines[0] if lines else ""
    found = re.search(r"http://[^/\s]+/", banner)
    if found is None:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"console did not start: {banner!r} {err!r}")
    try:
        yield ConsoleProcess(found.group(0).rstrip("/"), proc, banner)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err


def wait_until(check: Callable[[], object], timeout: float = 15.0, every: float = 0.2) -> bool:
    """True once ``check()`` holds within ``timeout`` seconds, False otherwise."""
    try:
        eventually_sync(check, within=timeout, every=every)
    except AssertionError:
        return False
    return True
