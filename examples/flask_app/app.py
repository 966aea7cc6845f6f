"""The application factory."""

from __future__ import annotations

import os
import secrets
from typing import Any

import flask
from werkzeug.security import generate_password_hash

import outbox
import outbox.flask
from flask_app.models import Note, User, db

# Absolute: Flask-SQLAlchemy would put a relative SQLite path in the instance folder, where the
# relay (run from the same directory) would not find it.
DEFAULT_DATABASE_URL = f"sqlite:///{os.path.abspath('flask_app.db')}"
MAX_NOTE_WORDS = 1000


def current_user() -> User | None:
    """The user of the request's bearer token (loaded once per request)."""
    if "user" not in flask.g:
        scheme, _, token = flask.request.headers.get("Authorization", "").partition(" ")
        flask.g.user = (db.session.scalar(db.select(User).where(User.token == token))
                        if scheme.lower() == "bearer" and token else None)
    user: User | None = flask.g.user
    return user


def create_app(config: dict[str, Any] | None = None) -> flask.Flask:
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("FLASK_APP_DATABASE_URL",
                                                           DEFAULT_DATABASE_URL)
    app.config.update(config or {})
    db.init_app(app)
    # The one line: each request gets its own outbox context, with the signed-in user.
    outbox.flask.init_app(app, user_id=lambda: (user := current_user()) and user.id)

    @app.cli.command("init-db")
    def init_db() -> None:
        """Create the application's tables and the outbox's."""
        db.create_all()
        outbox.create_schema(db.engine)

    @app.post("/signup")
    def signup() -> tuple[dict[str, Any], int]:
        body = flask.request.get_json()
        user = User(email=body["email"], password_hash=generate_password_hash(body["password"]),
                    token=secrets.token_hex(16))
        db.session.add(user)
        db.session.commit()
        return {"id": user.id, "token": user.token}, 201

    @app.post("/notes")
    def create_note() -> tuple[dict[str, Any], int]:
        user = current_user()
        if user is None:
            flask.abort(401)
        note = Note(author_id=user.id, text=flask.request.get_json()["text"])
        db.session.add(note)
        db.session.flush()  # the note's id; its event is written now, in this transaction
        if len(note.text.split()) > MAX_NOTE_WORDS:
            # not committed: Flask-SQLAlchemy's teardown rolls back the note and its event
            flask.abort(413, f"a note has at most {MAX_NOTE_WORDS} words")
        db.session.commit()
        return {"id": note.id}, 201

    return app
