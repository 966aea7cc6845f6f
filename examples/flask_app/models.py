"""Flask-SQLAlchemy's ``db`` and the tables — and ``outbox.capture(db.session)``, here, at import
of the module that makes ``db``: every ``db.session`` of every app the factory makes, in
requests, CLI commands, the relay's handlers and tests, writes events."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import outbox


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
# password_hash and token look like secrets: left out of events without being listed.
outbox.capture(db.session)


class User(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    token: Mapped[str] = mapped_column(sa.String(64), unique=True)


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    text: Mapped[str] = mapped_column(sa.Text())


class WordCount(db.Model):  # type: ignore[name-defined,misc]
    """Kept by the ``notes.create`` handler (handlers.py): words written per user."""

    __tablename__ = "word_counts"
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), primary_key=True)
    words: Mapped[int] = mapped_column(default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(
        default=lambda: dt.datetime.now(dt.UTC), onupdate=lambda: dt.datetime.now(dt.UTC))
