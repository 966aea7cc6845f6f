"""What one registration captures: ``capture()``'s arguments, checked, and a plan per model.

:class:`Scope` is what the flush, bulk and read listeners ask ("is this operation captured?",
"the plan of this mapper"); :class:`~outbox._capture.registry.Capture` adds the session it is
attached to. Every argument error is a :class:`~outbox.exceptions.CaptureError` raised here, at
``capture()``, not at the first flush.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.exc import UnmappedColumnError

from outbox._capture.plan import (
    LinkPlan,
    MapperPlan,
    build_plan,
    column_names,
    is_outbox_table,
)
from outbox._capture.sqlalchemy_internals import all_mappers
from outbox.events import Operation
from outbox.exceptions import CaptureError

__all__ = ["DEFAULT_OPERATIONS", "Models", "Scope"]

log = logging.getLogger("outbox.capture")

DEFAULT_OPERATIONS = (Operation.CREATE, Operation.UPDATE, Operation.DELETE)


class Models:
    """The ``models=`` argument, normalised: every model, one registry, or given mappers."""

    def __init__(self, models: Any) -> None:
        self.registry: sa.orm.registry | None = None
        self.mappers: frozenset[Mapper[Any]] | None = None
        if models is None:
            self.description = "every mapped class"
            return
        reg = models if isinstance(models, sa.orm.registry) else None
        if reg is None and isinstance(models, type) and sa.inspect(models, False) is None:
            reg = getattr(models, "registry", None)
            if not isinstance(reg, sa.orm.registry):
                raise CaptureError(
                    f"capture(models=...): {models.__qualname__} is neither a mapped class nor "
                    "a declarative base"
                )
        if reg is not None:
            self.registry = reg
            self.description = f"the models of {getattr(models, '__qualname__', reg)!r}"
            return
        items = [models] if isinstance(models, type) else list(_iterable(models, "models"))
        if not items:
            raise CaptureError("capture(models=...) is empty: nothing would be captured")
        mappers = set()
        for cls in items:
            mapper = _mapper_of(cls, "models")
            if is_outbox_table(mapper.local_table):
                raise CaptureError(
                    f"capture(models=...): {cls.__qualname__} is an outbox table; capturing it "
                    "would write an event for every event"
                )
            mappers.add(mapper)
        self.mappers = frozenset(mappers)
        self.description = ", ".join(sorted(m.class_.__qualname__ for m in mappers))

    def includes(self, mapper: Mapper[Any]) -> bool:
        if is_outbox_table(mapper.local_table):
            return False
        if self.mappers is not None:
            return any(mapper.isa(m) for m in self.mappers)
        if self.registry is not None:
            return mapper.registry is self.registry
        return True

    def known(self) -> list[Mapper[Any]]:
        """The mappers that exist now (validated at ``capture()``)."""
        if self.mappers is not None:
            return sorted(self.mappers, key=lambda m: m.class_.__qualname__)
        if self.registry is not None:
            return [m for m in self.registry.mappers if self.includes(m)]
        return []

    def key(self) -> object:
        return self.mappers if self.mappers is not None else self.registry


class Scope:
    """The checked arguments of one ``capture()`` call and the plans of its models."""

    def __init__(
        self,
        models: Any = None,
        operations: Iterable[str | Operation] = DEFAULT_OPERATIONS,
        exclude: Mapping[Any, Collection[str]] | None = None,
        include: Mapping[Any, Collection[str]] | None = None,
        associations: bool = True,
    ) -> None:
        if not isinstance(associations, bool):
            raise CaptureError(f"capture(associations=...) must be True or False, "
                               f"got {associations!r}")
        self.associations = associations
        self.models = Models(models)
        self.operations = _operations(operations)
        self.exclude = _columns(exclude, self.models, "exclude")
        self.include = _columns(include, self.models, "include")
        for cls, names in self.include.items():
            both = sorted(names & self.exclude.get(cls, frozenset()))
            if both:
                raise CaptureError(
                    f"capture(): {cls.__qualname__}.{both[0]} is in both exclude= and include="
                )
        self.create = Operation.CREATE in self.operations
        self.update = Operation.UPDATE in self.operations
        self.delete = Operation.DELETE in self.operations
        self.read = Operation.READ in self.operations
        self._plans: dict[Mapper[Any], MapperPlan | None] = {}
        self._table_mappers: dict[Any, Mapper[Any] | None] = {}
        self._links: dict[Any, tuple[LinkPlan | MapperPlan, dict[str, str]] | None] = {}
        # Validate what exists now: a bad model fails here rather than at the first flush.
        for mapper in self.models.known():
            self.plan(mapper)

    def signature(self) -> tuple[object, ...]:
        """Equal for two calls of ``capture()`` with the same arguments."""
        return (self.models.key(), self.operations, self.exclude, self.include,
                self.associations)

    def plan(self, mapper: Mapper[Any]) -> MapperPlan | None:
        """The capture plan of ``mapper``, or ``None`` when it is not captured."""
        try:
            return self._plans[mapper]
        except KeyError:
            pass
        plan = (build_plan(mapper, self.exclude, self.include)
                if self.models.includes(mapper) else None)
        self._plans[mapper] = plan
        if plan is not None and plan.secret_names:
            log.info(
                "capture: leaving %s out of events (the names look like secrets); "
                "capture(..., include={%s: {%s}}) records them", ", ".join(
                    f"{plan.model}.{name}" for name in plan.secret_names), plan.model,
                ", ".join(repr(n) for n in plan.secret_names))
        return plan

    def mapper_for_table(self, table: Any) -> Mapper[Any] | None:
        """The captured mapper whose own table is ``table`` (Core DML run through a session)."""
        try:
            return self._table_mappers[table]
        except (KeyError, TypeError):
            pass
        found = None
        for mapper in all_mappers():
            if mapper.local_table is table and (
                mapper.inherits is None or mapper.inherits.local_table is not table
            ):
                found = mapper if self.models.includes(mapper) else None
                break
        self._table_mappers[table] = found
        return found


    def link_plan(self, table: Any) -> tuple[LinkPlan | MapperPlan, dict[str, str]] | None:
        """For a ``secondary`` association table of a captured model: the plan its rows' events
        follow and ``{column key: the plan's key}``; ``None`` for any other table.

        A table that a captured model maps gets that model's events (whatever
        ``associations=`` says: the model is captured); an unmapped one gets events of its
        own when ``associations=True``.
        """
        try:
            return self._links[table]
        except (KeyError, TypeError):
            pass
        found: tuple[LinkPlan | MapperPlan, dict[str, str]] | None = None
        sides = _secondary_sides(table)
        if sides:
            mapper = self.mapper_for_table(table)
            plan = self.plan(mapper) if mapper is not None else None
            if plan is not None:
                keys = {}
                for col in table.columns:
                    try:
                        keys[col.key] = mapper.get_property_by_column(col).key  # type: ignore[union-attr]
                    except UnmappedColumnError:
                        continue
                found = (plan, keys)
            elif (mapper is None and self.associations
                  and any(self.models.includes(m) for m in sides)):
                found = (LinkPlan(table), {c.key: c.key for c in table.columns})
        self._links[table] = found
        return found


def _secondary_sides(table: Any) -> list[Mapper[Any]]:
    """The mappers on either side of a relationship whose ``secondary`` is ``table``."""
    sides: list[Mapper[Any]] = []
    for mapper in all_mappers():
        for rel in mapper.relationships:
            if rel.secondary is table:
                sides.extend((mapper, rel.mapper))
    return sides


def _iterable(value: Any, what: str) -> Iterable[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise CaptureError(f"capture({what}=...) must be a collection, got {value!r}")
    return value


def _mapper_of(cls: Any, what: str) -> Mapper[Any]:
    mapper = sa.inspect(cls, False) if isinstance(cls, type) else None
    if not isinstance(mapper, Mapper):
        name = getattr(cls, "__qualname__", repr(cls))
        raise CaptureError(f"capture({what}=...): {name} is not a mapped class")
    return mapper


def _columns(
    given: Mapping[Any, Collection[str]] | None, models: Models, what: str
) -> dict[type, frozenset[str]]:
    """``exclude=`` / ``include=``: ``{Model: {"column", ...}}``, checked against the mapping."""
    if not given:
        return {}
    if not isinstance(given, Mapping):
        raise CaptureError(f"capture({what}=...) must map a model to column names")
    out: dict[type, frozenset[str]] = {}
    for cls, names in given.items():
        mapper = _mapper_of(cls, what)
        if not models.includes(mapper):
            raise CaptureError(
                f"capture({what}=...): {cls.__qualname__} is not captured "
                f"(models: {models.description})"
            )
        columns = column_names(mapper)
        known = set(columns) | set(columns.values())
        name_set = frozenset(_iterable(names, f"{what}[{cls.__qualname__}]"))
        for name in sorted(name_set):
            if not isinstance(name, str) or name not in known:
                raise CaptureError(
                    f"capture({what}=...): {cls.__qualname__} has no column {name!r} "
                    f"(columns: {', '.join(sorted(columns.values()))})"
                )
        out[mapper.class_] = name_set
    return out


def _operations(operations: Iterable[str | Operation]) -> frozenset[Operation]:
    ops = set()
    for op in _iterable(operations, "operations"):
        try:
            ops.add(Operation(op))
        except ValueError:
            raise CaptureError(
                f"capture(operations=...): unknown operation {op!r} "
                f"(use {', '.join(sorted(o.value for o in Operation))})"
            ) from None
    if not ops:
        raise CaptureError("capture(operations=...) is empty: nothing would be captured")
    return frozenset(ops)
