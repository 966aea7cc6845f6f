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
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import ColumnProperty, Mapper

from outbox import _json
from outbox._capture.values import column_rule
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


class TablePlan:
    """What every event of one table shares: event types, and ``entity_id`` from a payload."""

    __slots__ = ("_types", "entity", "model", "pk_names", "schema", "table")

    def __init__(self, table: sa.Table, model: str, pk_names: Sequence[str]) -> None:
        self.table = table
        self.model = model
        self.entity = table.name
        self.schema: str | None = table.schema
        #: the key's column names, in the table's primary-key order
        self.pk_names: tuple[str, ...] = tuple(pk_names)
        self._types: dict[str, tuple[str, dict[Operation, str]]] = {}

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

    def entity_id(self, payload: Mapping[str, Any]) -> str:
        """The key's payload values as text: one column's value itself (a string as it is,
        anything else as JSON), several columns as a JSON array in primary-key order."""
        names = self.pk_names
        if len(names) == 1:
            value = payload[names[0]]
            return value if type(value) is str else json.dumps(value)
        return json.dumps([payload[n] for n in names], separators=(",", ":"),
                          ensure_ascii=False)


class LinkPlan(TablePlan):
    """An association table (``relationship(secondary=...)``) that no captured model maps:
    its rows' events carry every column; the key is the primary key, else every column."""

    __slots__ = ("_rules", "cols")

    def __init__(self, table: sa.Table) -> None:
        keys = list(table.primary_key.columns) or list(table.columns)
        super().__init__(table, table.name, [c.name for c in keys])
        #: (column key, column name)
        self.cols: tuple[tuple[str, str], ...] = tuple((c.key, c.name) for c in table.columns)
        self._rules: dict[Dialect, tuple[tuple[str, str, frozenset[type], Any], ...]] = {}

    def rules(self, dialect: Dialect) -> tuple[tuple[str, str, frozenset[type], Any], ...]:
        try:
            return self._rules[dialect]
        except KeyError:
            pass
        rules = self._rules[dialect] = tuple(
            (key, name, *_rule(self.table.c[key], dialect)) for key, name in self.cols)
        return rules

    def payload(
        self, values: Mapping[str, Any], dialect: Dialect
    ) -> tuple[dict[str, Any], list[str] | None]:
        return _payload(self.model, self.rules(dialect), values)


def _rule(column: sa.Column[Any], dialect: Dialect) -> tuple[frozenset[type], Any]:
    rule = column_rule(column, dialect)
    return rule.same, rule.convert


def _payload(
    model: str, rules: Sequence[tuple[str, str, frozenset[type], Any]], values: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str] | None]:
    """Column name -> stored value as JSON, and the keys whose value is inexact (or ``None``)."""
    out: dict[str, Any] = {}
    inexact: list[str] | None = None
    for key, name, same, convert in rules:
        value = values.get(key)
        if type(value) not in same:
            value, exact = convert(value)
            if not exact:
                if inexact is None:
                    inexact = []
                inexact.append(key)
        out[name] = value if type(value) in _FAST else jsonable(model, name, value)
    return out, inexact


class MapperPlan(TablePlan):
    """The captured shape of one mapper (see module docstring). Immutable after construction."""

    __slots__ = (
        "_rule_maps",
        "_rules",
        "bulk_columns",
        "bulk_ok",
        "cols",
        "columns",
        "compare",
        "excluded_keys",
        "excluded_names",
        "keyset",
        "mapper",
        "names",
        "onupdate_keys",
        "pk_cols",
        "pk_keys",
        "secret_names",
        "table_keys",
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
        pk_cols = _table_pk_order(mapper, table)
        super().__init__(table, mapper.class_.__qualname__, [c.name for c in pk_cols])
        tables = set(mapper.tables)
        cols: list[tuple[str, str]] = []
        columns: dict[str, sa.Column[Any]] = {}
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
            columns[prop.key] = col
            if (col.onupdate is not None or col.server_onupdate is not None
                    or (version_col is not None and col is version_col)):
                onupdate.append(prop.key)
        self.cols: tuple[tuple[str, str], ...] = tuple(cols)
        self.keyset = frozenset(k for k, _ in cols)
        #: attribute key -> the table column of each captured column
        self.columns = columns
        self.names: dict[str, str] = dict(cols)
        self.excluded_keys = frozenset(excluded)
        #: attribute key -> column name of the columns left out of events
        self.excluded_names = excluded
        #: columns left out because their names look like secrets (no exclude= for them)
        self.secret_names: tuple[str, ...] = tuple(secret)
        self.compare = compare
        self.onupdate_keys: tuple[str, ...] = tuple(onupdate)
        # entity_id follows the table's primary key (its PRIMARY KEY constraint's column order),
        # which for a joined-inheritance subclass is the same key as the base table's.
        self.pk_cols: tuple[sa.ColumnElement[Any], ...] = pk_cols
        self.pk_keys: tuple[str, ...] = tuple(
            mapper.get_property_by_column(c).key for c in pk_cols
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
        self.pk_names = tuple(self.names[k] for k in self.pk_keys)  # as the payload names them
        # ORM bulk INSERT/UPDATE/DELETE touch one table: RETURNING can only give its columns
        # (every column of it: excluded ones too, to tell a real change from none).
        local_keys = {k for k, _ in local}
        self.bulk_ok = all(k in local_keys for k in self.pk_keys) and all(
            k in local_keys for k, _ in cols
        )
        self.bulk_columns: tuple[tuple[str, sa.Column[Any]], ...] = tuple(local)
        #: per table of the mapping, the attribute keys of its primary key (in its order)
        self.table_keys: tuple[tuple[sa.Table, tuple[str, ...]], ...] = tuple(
            (t, tuple(mapper.get_property_by_column(c).key for c in t.primary_key.columns))
            for t in mapper.tables if isinstance(t, sa.Table))
        self._rules: dict[Dialect, tuple[tuple[str, str, frozenset[type], Any], ...]] = {}
        self._rule_maps: dict[Dialect, dict[str, tuple[frozenset[type], Any]]] = {}

    def __repr__(self) -> str:
        return f"<MapperPlan {self.model} -> {self.entity} ({len(self.cols)} columns)>"

    def rules(self, dialect: Dialect) -> tuple[tuple[str, str, frozenset[type], Any], ...]:
        """``(attribute key, column name, types stored as they are, convert)`` per captured
        column on ``dialect`` (:mod:`outbox._capture.values`)."""
        try:
            return self._rules[dialect]
        except KeyError:
            pass
        rules = self._rules[dialect] = tuple(
            (key, name, *_rule(self.columns[key], dialect)) for key, name in self.cols)
        return rules

    def payload(
        self, values: Mapping[str, Any], dialect: Dialect
    ) -> tuple[dict[str, Any], list[str] | None]:
        """Captured columns (by column name) from ``values`` keyed by attribute key, as stored,
        and the keys whose stored value the database converted (``None`` when there are none):
        those must be read back (see :mod:`outbox._capture.values`)."""
        return _payload(self.model, self.rules(dialect), values)

    def stored(self, values: Mapping[str, Any], dialect: Dialect) -> dict[str, Any]:
        """:meth:`payload` of values read from the database (exact whatever the rule says)."""
        return self.payload(values, dialect)[0]

    def inexact_keys(
        self, values: Mapping[str, Any], keys: Iterable[str], dialect: Dialect
    ) -> list[str]:
        """Which of ``keys`` hold a value the database would convert (to read it back)."""
        rules = self._rule_map(dialect)
        out = []
        for key in keys:
            rule = rules.get(key)
            if rule is None or key not in values:
                continue
            value = values[key]
            if type(value) not in rule[0] and not rule[1](value)[1]:
                out.append(key)
        return out

    def stored_value(self, key: str, value: Any, dialect: Dialect) -> Any:
        """One captured column's value as stored, as JSON (``metadata.changes``)."""
        same, convert = self._rule_map(dialect)[key]
        if type(value) not in same:
            value = convert(value)[0]
        return value if type(value) in _FAST else jsonable(self.model, self.names[key], value)

    def _rule_map(self, dialect: Dialect) -> dict[str, tuple[frozenset[type], Any]]:
        try:
            return self._rule_maps[dialect]
        except KeyError:
            pass
        found = self._rule_maps[dialect] = {
            key: (same, convert) for key, _, same, convert in self.rules(dialect)}
        return found

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


def _table_pk_order(mapper: Mapper[Any], table: sa.Table) -> tuple[sa.ColumnElement[Any], ...]:
    """The mapper's primary key columns in the order of ``table``'s PRIMARY KEY constraint."""
    mapped = list(mapper.primary_key)
    if len(mapped) < 2:
        return tuple(mapped)
    order = list(table.primary_key.columns)
    position = {}
    for col in mapped:
        for i, own in enumerate(order):
            if own is col or own.shares_lineage(col):
                position[col] = i
                break
    if len(position) != len(mapped):
        return tuple(mapped)  # a mapper key not on the table's constraint: keep the mapper's
    return tuple(sorted(mapped, key=position.__getitem__))


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
