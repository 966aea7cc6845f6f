"""An ``--app`` module for relay tests run as subprocesses (``python -m outbox.relay --app``).

Its one handler records every event it sees as a row of ``handled`` in the database named by
``RELAY_TEST_RECORD_URL`` (a psycopg conninfo/URL), committed before the handler returns — so a
relay killed at any moment never has a handled event that is not recorded. Each row stores the
event id, its ordering key and seq, the recording process, and a global serial ``n`` that gives
the order in which handlers ran.

``RELAY_TEST_SLEEP`` (seconds, optional) makes the handler sleep after recording (to keep a batch
in hand while a test sends a signal).

The test creates ``handled`` itself (test_relay_torture.TABLE_DDL): importing this module
registers its handler on the default broker, so only the relay subprocesses import it.
"""

from __future__ import annotations

import os
import threading
import time

import psycopg

import outbox

_local = threading.local()


def _conn() -> psycopg.Connection[tuple[object, ...]]:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        # visible before the handler returns; no fsync wait (a server crash is not under test)
        conn = psycopg.connect(os.environ["RELAY_TEST_RECORD_URL"], autocommit=True,
                               options="-c synchronous_commit=off")
        _local.conn = conn
    return conn


@outbox.subscribe("*", name="tests.relay_app.record")
def record(event: outbox.Event) -> None:
    _conn().execute(
        "INSERT INTO handled (event_id, ordering_key, seq, pid) VALUES (%s, %s, %s, %s)",
        (event.id, event.ordering_key, event.seq, os.getpid()),
    )
    pause = float(os.environ.get("RELAY_TEST_SLEEP") or 0)
    if pause:
        time.sleep(pause)
