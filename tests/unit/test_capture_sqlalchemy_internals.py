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


class Stamped(Base):
    __tablename__ = "internals_stamped"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    shout: Mapped[str | None] = mapped_column(
        onupdate=lambda ctx: ctx.get_current_parameters()["name"].upper())
    tags: Mapped[list[Item]] = sa.orm.relationship(secondary="internals_links")


links = sa.Table(
    "internals_links", Base.metadata,
    sa.Column("stamped_id", sa.ForeignKey("internals_stamped.id"), primary_key=True),
    sa.Column("item_id", sa.ForeignKey("internals_items.id"), primary_key=True),
)


def test_unit_of_work_statements_prefetch_and_update_keys() -> None:
    """What :mod:`outbox._capture.statements` reads from the flush's statements."""
    engine = sa.create_engine("sqlite://")
    Base.metadata.create_all(engine)
    seen: list[tuple[str, bool, list[str], list[dict[str, object]]]] = []

    def after(conn, clause, multiparams, params, options, result):  # type: ignore[no-untyped-def]
        if isinstance(clause, sa.sql.dml.UpdateBase):
            seen.append((type(clause).__name__ + " " + clause.table.name,
                         internals.unit_of_work_statement(options),
                         [c.key for c in internals.prefetched_columns(result.context)],
                         list(result.context.compiled_parameters)))

    sa.event.listen(engine, "after_execute", after)
    with Session(engine) as s:
        rows = [Stamped(name=n, tags=[Item(name="i")]) for n in ("a", "b")]
        s.add_all(rows)
        s.flush()
        for row, name in zip(rows, ("c", "d"), strict=True):
            row.name = name
        s.flush()
        seen_before_delete = len(seen)
        rows[0].tags.clear()
        s.flush()
    by_kind = {kind: (uow, prefetch, params) for kind, uow, prefetch, params in seen}
    assert by_kind["Insert internals_stamped"][0] is True, VERSION
    assert by_kind["Insert internals_links"][0] is False, VERSION  # secondary rows
    assert by_kind["Delete internals_links"][0] is False, VERSION
    uow, prefetch, params = by_kind["Update internals_stamped"]
    assert uow is True and prefetch == ["shout"], VERSION
    key = internals.update_key_param(Stamped.__table__.c.id)
    assert [(p[key], p["shout"]) for p in params] == [(1, "C"), (2, "D")], VERSION
    assert seen_before_delete < len(seen)
    engine.dispose()
