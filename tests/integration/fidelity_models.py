"""A model set shaped like a real application, for the capture fidelity tests and the oracle.

Single-table and joined-table inheritance, a many-to-many through an unmapped ``secondary``
table, a mapped model that is also a ``secondary`` (favourites), a composite key declared in
another order than its columns, Python-side and SQL ``onupdate``, server defaults, a version
counter, ``TypeDecorator``s, cascades and orphan deletes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Stores naive UTC, gives back aware UTC (a common application recipe)."""

    impl = sa.DateTime()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            return value.astimezone(dt.UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value.replace(tzinfo=dt.UTC) if value is not None else None


class Lowered(sa.TypeDecorator[str]):
    """Stores text in lower case."""

    impl = sa.String(100)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def shout(ctx: Any) -> str | None:
    """``onupdate`` computed per row from the row's parameters (when the name changes)."""
    name = ctx.get_current_parameters().get("name")
    return name.upper() if isinstance(name, str) else None


class Base(DeclarativeBase):
    pass


recipe_tags = sa.Table(
    "fid_recipe_tags", Base.metadata,
    sa.Column("recipe_id", sa.ForeignKey("fid_recipes.id")),
    sa.Column("tag_id", sa.ForeignKey("fid_tags.id")),
    sa.PrimaryKeyConstraint("recipe_id", "tag_id"),
)


class Person(Base):
    __tablename__ = "fid_people"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    name: Mapped[str] = mapped_column(sa.String(50))
    email: Mapped[str | None] = mapped_column(Lowered())
    shout: Mapped[str | None] = mapped_column(sa.String(50), onupdate=shout)
    note: Mapped[str | None] = mapped_column(sa.String(20))
    birthday: Mapped[dt.date | None] = mapped_column(sa.Date())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), onupdate=utcnow)
    status: Mapped[str] = mapped_column(sa.String(10), server_default="new")
    version: Mapped[int] = mapped_column()
    stars: Mapped[int | None] = mapped_column()  # Chef's (single-table inheritance)
    recipes: Mapped[list[Recipe]] = relationship(
        back_populates="author", cascade="all, delete-orphan", order_by="Recipe.id")
    favorites: Mapped[list[Recipe]] = relationship(secondary="fid_favorites", order_by="Recipe.id")
    __mapper_args__ = {
        "polymorphic_on": "kind", "polymorphic_identity": "person", "version_id_col": version,
    }


class Chef(Person):
    __mapper_args__ = {"polymorphic_identity": "chef"}


class Tag(Base):
    __tablename__ = "fid_tags"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(30))


class Recipe(Base):
    __tablename__ = "fid_recipes"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(50))
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("fid_people.id"))
    revision: Mapped[int] = mapped_column(default=0, onupdate=sa.text("revision + 1"))
    author: Mapped[Person | None] = relationship(back_populates="recipes")
    tags: Mapped[list[Tag]] = relationship(secondary=recipe_tags, order_by="Tag.id")
    steps: Mapped[list[Step]] = relationship(
        cascade="all, delete-orphan", order_by="Step.position")


class Step(Base):
    """Composite key declared (position, recipe_id): not the columns' order."""

    __tablename__ = "fid_steps"

    recipe_id: Mapped[int] = mapped_column(sa.ForeignKey("fid_recipes.id"))
    position: Mapped[int] = mapped_column()
    text: Mapped[str] = mapped_column(sa.String(50))
    __table_args__ = (sa.PrimaryKeyConstraint("position", "recipe_id"),)


class Favorite(Base):
    """A mapped model whose table is also ``Person.favorites``' secondary."""

    __tablename__ = "fid_favorites"

    person_id: Mapped[int] = mapped_column(sa.ForeignKey("fid_people.id"), primary_key=True)
    recipe_id: Mapped[int] = mapped_column(
        sa.ForeignKey("fid_recipes.id"), primary_key=True)
    added_on: Mapped[dt.date | None] = mapped_column(
        sa.Date(), server_default=sa.text("CURRENT_DATE"))


class Item(Base):
    """Joined-table inheritance: a Gadget row spans fid_items and fid_gadgets."""

    __tablename__ = "fid_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    type: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "item"}


class Gadget(Item):
    __tablename__ = "fid_gadgets"

    id: Mapped[int] = mapped_column(sa.ForeignKey("fid_items.id"), primary_key=True)
    power: Mapped[int] = mapped_column(default=1)
    __mapper_args__ = {"polymorphic_identity": "gadget"}


APP_TABLES = [t.name for t in Base.metadata.sorted_tables]
