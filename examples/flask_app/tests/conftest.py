"""The example app on a SQLite file of each test's own (no server needed).

The application is imported when a fixture needs it, not when the tests are collected: its
``outbox.capture(db.session)`` is process-wide, and the repository's own tests share the process.
It is removed again when the example's tests are done.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from flask.testing import FlaskClient

import outbox

EXAMPLES = Path(__file__).resolve().parents[2]


def db() -> Any:
    """The application's Flask-SQLAlchemy ``db`` (importing the app on first use)."""
    from flask_app.models import db

    return db


@pytest.fixture(scope="package", autouse=True)
def _remove_the_apps_capture() -> Iterator[None]:
    yield
    from outbox.testing import captures

    for registration in captures():
        if registration.target is db().session:
            registration.remove()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/flask_app.db"


@pytest.fixture
def app(database_url: str) -> Iterator[flask.Flask]:
    from flask_app.app import create_app

    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "TESTING": True})
    with app.app_context():
        db().create_all()
        outbox.create_schema(db().engine)
    yield app
    with app.app_context():
        db().engine.dispose()


@pytest.fixture
def client(app: flask.Flask) -> FlaskClient:
    return app.test_client()
