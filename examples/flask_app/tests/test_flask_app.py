"""The example application with Flask's test client, outbox's pytest plugin, and the relay."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import flask
from flask.testing import FlaskClient

from flask_app.tests.conftest import EXAMPLES, db
from outbox.testing import EventRecorder


def sign_up(client: FlaskClient) -> tuple[int, dict[str, str]]:
    r = client.post("/signup", json={"email": f"{uuid.uuid4().hex[:8]}@example.com",
                                     "password": "s3cret!"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.get_json()
    return body["id"], {"Authorization": f"Bearer {body['token']}"}


def test_notes_are_written_by_the_signed_in_user(
    app: flask.Flask, client: FlaskClient, outbox_recorder: EventRecorder
) -> None:
    with app.app_context():
        outbox_recorder.watch(db().engine)  # rows committed to the events table from now on
    user_id, auth = sign_up(client)
    other_id, other = sign_up(client)
    with outbox_recorder.block() as emitted:
        assert client.post("/notes", json={"text": "hello there"}, headers=auth).status_code \
            == 201
        assert client.post("/notes", json={"text": "hi"}, headers=other).status_code == 201
    emitted.assert_emitted("main.notes.create", payload={"text": "hello there"},
                           user_id=str(user_id), count=1)
    emitted.assert_emitted("main.notes.create", payload={"text": "hi"}, user_id=str(other_id))
    # signing up is anonymous, and the secrets of a user never reach an event
    signup = outbox_recorder.assert_emitted("main.users.create", entity_id=str(user_id))
    assert signup.user_id is None
    assert set(signup.payload) == {"id", "email"}  # no password_hash, no token
    # the scope ends with the request: the next one, anonymous, has no user
    late_id, _ = sign_up(client)
    assert outbox_recorder.assert_emitted("main.users.create", entity_id=str(late_id)) \
        .user_id is None


def test_anonymous_requests_write_nothing(client: FlaskClient,
                                          outbox_recorder: EventRecorder, app: flask.Flask) -> None:
    with app.app_context():
        outbox_recorder.watch(db().engine)
    assert client.post("/notes", json={"text": "x"}).status_code == 401
    outbox_recorder.assert_not_emitted("*")


def test_a_note_refused_after_its_flush_leaves_no_event(
    app: flask.Flask, client: FlaskClient, outbox_recorder: EventRecorder
) -> None:
    with app.app_context():
        outbox_recorder.watch(db().engine)
    _, auth = sign_up(client)
    with outbox_recorder.block() as emitted:
        r = client.post("/notes", json={"text": "word " * 1001}, headers=auth)
        assert r.status_code == 413
    emitted.assert_not_emitted("main.notes.*")


def test_the_relay_sidecar_counts_the_words_once(
    app: flask.Flask, client: FlaskClient, database_url: str
) -> None:
    user_id, auth = sign_up(client)
    for text in ("one two three", "four five"):
        assert client.post("/notes", json={"text": text}, headers=auth).status_code == 201
    env = {**os.environ, "FLASK_APP_DATABASE_URL": database_url,
           "OUTBOX_DATABASE_URL": database_url}
    for _ in range(2):  # the second run finds nothing due: nothing counted twice
        done = subprocess.run(
            [sys.executable, "-m", "outbox.relay", "--once", "--app", "flask_app.handlers"],
            cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    from flask_app.models import WordCount

    with app.app_context():
        counts = db().session.get(WordCount, user_id)
        assert counts is not None and counts.words == 5
