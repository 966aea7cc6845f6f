"""The private SQLAlchemy attributes capture reads still exist and mean what capture assumes.

Checked on SQLAlchemy 2.0.30 and 2.1.9 (``CHECKED_ON``; pyproject.toml allows >=2.0.30,<2.2).
A SQLAlchemy release that renames or removes one of them fails here, by name, instead of
making capture miss events. To check another release: install it and run this file and
``tests/integration/test_capture_bulk.py``.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox._capture import sqlalchemy_internals as internals

VERSION = (f"SQLAlchemy {sa.__version__} (capture was checked on "
           f"{' and '.join(internals.CHECKED_ON)})")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "internals_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


items: sa.Table = Item.__table__  # type: ignore[assignment]


def test_checked_on_names_the_oldest_and_newest_release() -> None:
    oldest, newest = internals.CHECKED_ON
    assert oldest == "2.0.30"  # the floor in pyproject.toml
    assert tuple(int(p) for p in newest.split(".")) < (2, 2)


def test_all_registries_lists_every_mapper() -> None:
    assert sa.inspect(Item) in internals.all_mappers(), VERSION


def test_return_defaults_flag() -> None:
    for stmt in (sa.insert(items), sa.update(items), sa.delete(items)):
        assert internals.returns_defaults(stmt) is False, VERSION
    assert internals.returns_defaults(sa.insert(items).return_defaults()) is True, VERSION
    assert internals.returns_defaults(sa.update(items).return_defaults()) is True, VERSION


def test_upsert_clause() -> None:
    assert internals.upsert_clause(sa.insert(items)) is None, VERSION
    for insert in (postgresql.insert, sqlite.insert):
        assert internals.upsert_clause(insert(items)) is None, VERSION
        nothing = internals.upsert_clause(insert(items).on_conflict_do_nothing())
        assert type(nothing).__name__ == "OnConflictDoNothing", VERSION
        update = internals.upsert_clause(
            insert(items).on_conflict_do_update(index_elements=["id"], set_={"name": "x"})
        )
        assert type(update).__name__ == "OnConflictDoUpdate", VERSION
    duplicate = mysql.insert(items).on_duplicate_key_update(name="x")
    assert internals.upsert_clause(duplicate) is not None, VERSION


def test_rowcount_can_be_set_after_it_was_read() -> None:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(items), [{"id": i, "name": "a"} for i in range(3)])
        result = conn.execute(sa.update(items).values(name="b").returning(items.c.id))
        assert len(result.all()) == 3
        assert isinstance(result, CursorResult)
        result.rowcount  # noqa: B018 - memoized: the value set below must replace it
        internals.set_rowcount(result, 7)
        assert result.rowcount == 7, VERSION
    engine.dispose()


def test_cursor_result_under_an_orm_result() -> None:
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Item(id=1, name="a"))
        session.flush()
        orm = session.execute(
            sa.update(Item).where(Item.id == 1).values(name="b").returning(Item.id)
        )
        assert not isinstance(orm, CursorResult)  # the ORM wraps it when RETURNING is used
        assert isinstance(internals.cursor_result(orm), CursorResult), VERSION
        core = session.connection().execute(sa.delete(items))
        assert internals.cursor_result(core) is core
    engine.dispose()
