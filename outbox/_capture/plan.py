"""Per-mapper capture plans: what goes into an event for one mapped class, computed once.

A :class:`MapperPlan` holds everything the flush hot path needs for a model (the captured columns
as ``(attribute key, column name)`` pairs, the primary key, table, schema and event types), so
that a flush only walks plain tuples instead of inspecting mappers. It also turns row values into
JSON (raising :class:`SerializationError` naming model and column) and fetches column
values the ORM does not have in memory (expired or deferred attributes) with one Core ``SELECT``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import ColumnProperty, Mapper

from outbox import _json
from outbox._secret_names import looks_secret
from outbox.events import Operation, OutboxBase, event_type
from outbox.exceptions import CaptureError, SerializationError

__all__ = ["MapperPlan", "build_plan", "is_outbox_table", "jsonable"]

_FAST: frozenset[type] = frozenset({str, int, bool, type(None)})


def is_outbox_table(table: Any) -> bool:
    """True for the outbox's own tables (never captured: that would loop)."""
    return getattr(table, "metadata", None) is OutboxBase.metadata


def jsonable(model: str, column: str, value: Any) -> Any:
    """``value`` as JSON-safe data, or :class:`SerializationError` naming model and column."""
    if type(value) in _FAST:
        return value
    try:
        return _json.to_jsonable(value)
    except _json.NotSerialisable as exc:
        where = f"{column}{exc.path if exc.path.startswith('[') else '.' + exc.path}" \
            if exc.path else column
        raise SerializationError(model, where, exc.value) from None


class MapperPlan:
    """The captured shape of one mapper (see module docstring). Immutable after construction."""

    __slots__ = (
        "_types",
        "bulk_columns",
        "bulk_ok",
        "cols",
        "compare",
        "entity",
        "excluded_keys",
        "excluded_names",
        "keyset",
        "mapper",
        "model",
        "names",
        "onupdate_keys",
        "pk_cols",
        "pk_keys",
        "schema",
        "secret_names",
        "table",
    )

    def __init__(
        self, mapper: Mapper[Any], exclude: frozenset[str], include: frozenset[str] = frozenset()
    ) -> None:
        table = mapper.local_table
        if not isinstance(table, sa.Table):
            raise CaptureError(
                f"cannot capture {mapper.class_.__qualname__}: it is mapped to "
                f"{type(table).__name__}, not a table"
            )
        if not mapper.primary_key:
            raise CaptureError(
                f"cannot capture {mapper.class_.__qualname__}: it has no primary key "
                "(an event needs entity_id)"
            )
        self.mapper = mapper
        self.model = mapper.class_.__qualname__
        self.table = table
        self.entity = table.name
        self.schema: str | None = table.schema
        tables = set(mapper.tables)
        cols: list[tuple[str, str]] = []
        compare: dict[str, Any] = {}
        local: list[tuple[str, sa.Column[Any]]] = []
        seen: set[str] = set()
        excluded: dict[str, str] = {}
        secret: list[str] = []
        onupdate: list[str] = []
        version_col = mapper.version_id_col
        for col in mapper.columns:
            if not isinstance(col, sa.Column) or col.table not in tables:
                continue  # column_property(<expression>) etc.: not part of the row
            prop = mapper.get_property_by_column(col)
            if not isinstance(prop, ColumnProperty) or prop.key in seen:
                continue  # joined inheritance maps parent.id and child.id to one attribute
            seen.add(prop.key)
            compare[prop.key] = col.type.compare_values
            if col.table is table:
                local.append((prop.key, col))
            if col.name in exclude or prop.key in exclude:
                excluded[prop.key] = col.name
                continue
            if (looks_secret(col.name) or looks_secret(prop.key)) and not (
                    col.name in include or prop.key in include):
                excluded[prop.key] = col.name
                secret.append(col.name)
                continue
            cols.append((prop.key, col.name))
            if (col.onupdate is not None or col.server_onupdate is not None
                    or (version_col is not None and col is version_col)):
                onupdate.append(prop.key)
        self.cols: tuple[tuple[str, str], ...] = tuple(cols)
        self.keyset = frozenset(k for k, _ in cols)
        self.names: dict[str, str] = dict(cols)
        self.excluded_keys = frozenset(excluded)
        #: attribute key -> column name of the columns left out of events
        self.excluded_names = excluded
        #: columns left out because their names look like secrets (no exclude= for them)
        self.secret_names: tuple[str, ...] = tuple(secret)
        self.compare = compare
        self.onupdate_keys: tuple[str, ...] = tuple(onupdate)
        self.pk_cols: tuple[sa.ColumnElement[Any], ...] = tuple(mapper.primary_key)
        self.pk_keys: tuple[str, ...] = tuple(
            mapper.get_property_by_column(c).key for c in mapper.primary_key
        )
        hidden = [excluded[k] for k in self.pk_keys if k in excluded]
        if hidden:
            why = "looks like a secret" if hidden[0] in secret else "is in exclude="
            raise CaptureError(
                f"cannot capture {self.model}: its primary key {hidden[0]!r} {why}, yet it "
                "would be every event's entity_id; give the table another key, leave the "
                f"model out (models=...), or capture it (include={{{self.model}: "
                f"{{{hidden[0]!r}}}}})"
            )
        # ORM bulk INSERT/UPDATE/DELETE touch one table: RETURNING can only give its columns
        # (every column of it: excluded ones too, to tell a real change from none).
        local_keys = {k for k, _ in local}
        self.bulk_ok = all(k in local_keys for k in self.pk_keys) and all(
            k in local_keys for k, _ in cols
        )
        self.bulk_columns: tuple[tuple[str, sa.Column[Any]], ...] = tuple(local)
        self._types: dict[str, tuple[str, dict[Operation, str]]] = {}

    def __repr__(self) -> str:
        return f"<MapperPlan {self.model} -> {self.entity} ({len(self.cols)} columns)>"

    # -- naming -------------------------------------------------------------------------------

    def types(self, default_schema: str | None) -> tuple[str, dict[Operation, str]]:
        """``(schema, {operation: event type})`` for a dialect's default schema."""
        cache_key = default_schema or ""
        try:
            return self._types[cache_key]
        except KeyError:
            pass
        schema = self.schema or default_schema or ""
        found = (schema, {op: event_type(schema, self.entity, op.value) for op in Operation})
        self._types[cache_key] = found
        return found

    # -- values -------------------------------------------------------------------------------

    def entity_id(self, pk_values: Sequence[Any]) -> str:
        """Primary key as text: the value itself, or a JSON array for composite keys."""
        if len(pk_values) == 1:
            value = pk_values[0]
            kind = type(value)
            if kind is str or kind is int:
                return str(value)
            converted = jsonable(self.model, self.pk_keys[0], value)
            return converted if isinstance(converted, str) else json.dumps(converted)
        parts = [jsonable(self.model, k, v) for k, v in zip(self.pk_keys, pk_values, strict=True)]
        return json.dumps(parts, separators=(",", ":"), ensure_ascii=False)

    def payload(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Captured columns (by column name) from ``values`` keyed by attribute key."""
        model = self.model
        out: dict[str, Any] = {}
        for key, name in self.cols:
            value = values.get(key)
            out[name] = value if type(value) in _FAST else jsonable(model, name, value)
        return out

    def fetch(
        self,
        connection: Connection,
        identities: Iterable[Sequence[Any]],
        keys: Iterable[str],
        *,
        lock: bool = False,
    ) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Current database values of ``keys`` for rows by primary key (one SELECT per 500).

        ``lock``: ``FOR UPDATE`` where the dialect has it, so the values read are the ones the
        following UPDATE/DELETE of this transaction replaces.
        """
        key_list = sorted(set(keys))
        props = self.mapper.column_attrs
        columns = [props[k].columns[0] for k in key_list]
        pk_cols = list(self.pk_cols)
        idents = [tuple(i) for i in identities]
        found: dict[tuple[Any, ...], dict[str, Any]] = {}
        for start in range(0, len(idents), 500):
            chunk = idents[start:start + 500]
            if len(pk_cols) == 1:
                where = pk_cols[0].in_([i[0] for i in chunk])
            else:
                where = sa.tuple_(*pk_cols).in_(chunk)
            stmt = (
                sa.select(*pk_cols, *columns)
                .select_from(self.mapper.persist_selectable)
                .where(where)
            )
            if lock and connection.dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            n = len(pk_cols)
            for row in connection.execute(stmt):
                found[tuple(row[:n])] = dict(zip(key_list, row[n:], strict=True))
        return found


def build_plan(
    mapper: Mapper[Any],
    exclude: Mapping[type, frozenset[str]],
    include: Mapping[type, frozenset[str]] | None = None,
) -> MapperPlan:
    """The plan for ``mapper``, with the excludes/includes of it and its mapped superclasses."""
    names: set[str] = set()
    kept: set[str] = set()
    for m in mapper.iterate_to_root():
        names |= exclude.get(m.class_, frozenset())
        kept |= (include or {}).get(m.class_, frozenset())
    return MapperPlan(mapper, frozenset(names), frozenset(kept))


def column_names(mapper: Mapper[Any]) -> dict[str, str]:
    """Attribute key -> column name of the table columns of ``mapper`` (no configure needed)."""
    tables = set(mapper.tables)
    out: dict[str, str] = {}
    for col in mapper.columns:
        if isinstance(col, sa.Column) and col.table in tables:
            prop = mapper.get_property_by_column(col)
            out.setdefault(prop.key, col.name)
    return out
