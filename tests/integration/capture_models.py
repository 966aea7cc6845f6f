"""Models and helpers shared by the capture tests."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import outbox
from outbox.events import Event


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "cap_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    email: Mapped[str | None] = mapped_column(sa.String(100))
    password: Mapped[str | None] = mapped_column(sa.String(100))


class Tag(Base):
    """Composite primary key."""

    __tablename__ = "cap_tags"

    owner_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50), primary_key=True)
    weight: Mapped[int] = mapped_column(default=0)


class Doc(Base):
    """UUID primary key, a JSON column and a deferred column."""

    __tablename__ = "cap_docs"

    id: Mapped[uuid.UUID] = mapped_column(sa.Uuid(), primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(sa.String(100))
    data: Mapped[Any] = mapped_column(sa.JSON(), nullable=True)
    body: Mapped[str | None] = mapped_column(sa.Text(), deferred=True)


class Stamped(Base):
    """Columns the database fills: a server default and an onupdate expression."""

    __tablename__ = "cap_stamped"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    kind: Mapped[str] = mapped_column(sa.String(20), server_default="plain")
    revision: Mapped[int] = mapped_column(default=0, onupdate=sa.text("revision + 1"))


class Parent(Base):
    __tablename__ = "cap_parents"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    children: Mapped[list[Child]] = relationship(
        back_populates="parent", cascade="all, delete-orphan", order_by="Child.id"
    )


class Child(Base):
    __tablename__ = "cap_children"

    id: Mapped[int] = mapped_column(primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("cap_parents.id"))
    name: Mapped[str] = mapped_column(sa.String(50))
    parent: Mapped[Parent | None] = relationship(back_populates="children")


class Employee(Base):
    """Joined-table inheritance: Manager rows span two tables."""

    __tablename__ = "cap_employees"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Manager(Employee):
    __tablename__ = "cap_managers"

    id: Mapped[int] = mapped_column(sa.ForeignKey("cap_employees.id"), primary_key=True)
    reports: Mapped[int] = mapped_column(default=0)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Kinds(Base):
    """One column per serialised type."""

    __tablename__ = "cap_kinds"

    id: Mapped[int] = mapped_column(primary_key=True)
    naive: Mapped[dt.datetime | None] = mapped_column(sa.DateTime())
    aware: Mapped[dt.datetime | None] = mapped_column(sa.DateTime(timezone=True))
    day: Mapped[dt.date | None] = mapped_column(sa.Date())
    clock: Mapped[dt.time | None] = mapped_column(sa.Time())
    amount: Mapped[decimal.Decimal | None] = mapped_column(sa.Numeric(12, 4))
    ref: Mapped[uuid.UUID | None] = mapped_column(sa.Uuid())
    color: Mapped[Color | None] = mapped_column(sa.Enum(Color))
    blob: Mapped[bytes | None] = mapped_column(sa.LargeBinary())
    doc: Mapped[Any] = mapped_column(sa.JSON(), nullable=True)
    ratio: Mapped[float | None] = mapped_column(sa.Float())
    flag: Mapped[bool | None] = mapped_column(sa.Boolean())
    span: Mapped[dt.timedelta | None] = mapped_column(sa.Interval())


class Opaque:
    """A value no JSON rule covers."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class Pickled(Base):
    __tablename__ = "cap_pickled"

    id: Mapped[int] = mapped_column(primary_key=True)
    thing: Mapped[Any] = mapped_column(sa.PickleType(), nullable=True)


@dataclass
class Db:
    engine: sa.Engine
    Session: sessionmaker[Session]
    capture: outbox.Capture

    @property
    def default_schema(self) -> str:
        with self.engine.connect() as conn:
            name = conn.dialect.default_schema_name
        assert name
        return name

    def events(self, **where: Any) -> list[Event]:
        """Committed events, in seq order (read with a session that captures nothing)."""
        with Session(self.engine) as s:
            stmt = sa.select(Event).order_by(Event.seq)
            for key, value in where.items():
                stmt = stmt.where(getattr(Event, key) == value)
            return list(s.scalars(stmt))

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(Event)) or 0)


def make_engine(url: str) -> sa.Engine:
    """An engine; on SQLite with real transactions, so that SAVEPOINT works (see outbox.sqlite)."""
    return outbox.sqlite.sqlite_savepoints(sa.create_engine(url))


def make_db(url: str, **capture_kw: Any) -> Iterator[Db]:
    """Outbox schema + the test models on ``url``, a sessionmaker captured with ``capture_kw``."""
    engine = make_engine(url)
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    handle = outbox.capture(factory, **capture_kw)
    try:
        yield Db(engine, factory, handle)
    finally:
        handle.remove()
        engine.dispose()


@pytest.fixture(params=["postgresql", "psycopg2", "sqlite", "mariadb"])
def any_url(request: pytest.FixtureRequest) -> str:
    """An empty database on each supported dialect (PostgreSQL on psycopg 3 and psycopg2)."""
    fixture = {"postgresql": "pg_url", "psycopg2": "pg_url", "sqlite": "sqlite_url",
               "mariadb": "mariadb_url"}
    url: str = request.getfixturevalue(fixture[request.param])
    if request.param == "psycopg2":
        url = url.replace("+psycopg", "+psycopg2")
    return url
