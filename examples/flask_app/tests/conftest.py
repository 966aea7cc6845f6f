"""The example app on a SQLite file of each test's own (no server needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import flask
import pytest
from flask.testing import FlaskClient

import outbox
from flask_app import create_app
from flask_app.models import db

EXAMPLES = Path(__file__).resolve().parents[2]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/flask_app.db"


@pytest.fixture
def app(database_url: str) -> Iterator[flask.Flask]:
    app = create_app({"SQLALCHEMY_DATABASE_URI": database_url, "TESTING": True})
    with app.app_context():
        db.create_all()
        outbox.create_schema(db.engine)
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: flask.Flask) -> FlaskClient:
    return app.test_client()
