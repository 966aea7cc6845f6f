"""What a column stores for a Python value: the rule behind every payload value.

A payload holds what the database stored, not what the application handed the ORM. For each
column, per dialect, :func:`column_rule` decides from the column's type:

1. A ``TypeDecorator``'s ``process_bind_param`` is applied (as SQLAlchemy does before binding),
   then the rest of the rule uses the type it binds to (``load_dialect_impl``).
2. ``Enum`` columns store the string SQLAlchemy binds for a member (by default its *name*).
3. A value of exactly the type the column stores (``str`` in a string column, ``int`` in an
   integer column, ``date`` in a ``Date`` column, a naive ``datetime`` in ``DateTime()``, an
   aware one in ``DateTime(timezone=True)`` on PostgreSQL, ...) is stored as it is. SQLAlchemy's
   ``Interval`` and ``PickleType`` count as plain types (a ``timedelta``, a pickled object) on
   every dialect, although some dialects build them as ``TypeDecorator``s.
4. Anything else — a ``datetime`` in a ``Date`` column, ``140`` in a string column, a ``float``
   in an integer or ``Numeric`` column, more decimal places than the column's scale, an
   ``IntEnum`` or a ``str`` subclass, fractions of a second where MariaDB/MySQL keep none —
   is *inexact*: the database converted it on the way in,
   so capture reads the stored value back after the flush (one ``SELECT`` per model and flush,
   only when such a value occurs) instead of guessing the conversion.

Types the rule does not know (driver-specific and user-defined ``TypeEngine`` classes) keep
their value as it is. The value then becomes JSON by :mod:`outbox._json`'s rules.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["ColumnRule", "column_rule"]

#: ``convert(value) -> (stored value, exact)``; ``None`` when values are stored as they are.
Convert = Callable[[Any], tuple[Any, bool]]

_NONE = type(None)


class ColumnRule:
    """How one column's values are stored on one dialect.

    ``same``: Python types stored as they are (``None`` included) — the hot path checks
    ``type(value) in rule.same`` and goes no further. Other values go through ``convert``.
    """

    __slots__ = ("convert", "same")

    def __init__(self, same: frozenset[type], convert: Convert) -> None:
        self.same = same
        self.convert = convert


def _inexact(value: Any) -> tuple[Any, bool]:
    return value, False


def _as_is(value: Any) -> tuple[Any, bool]:
    return value, True


def _decimal_rule(scale: int | None) -> Convert:
    def convert(value: Any) -> tuple[Any, bool]:
        if type(value) is decimal.Decimal:
            if not value.is_finite():
                return value, False
            exponent = value.as_tuple().exponent
            assert isinstance(exponent, int)
            return value, scale is None or -exponent <= scale
        return value, False

    return convert


def _datetime_rule(aware: bool, fraction: bool) -> Convert:
    def convert(value: Any) -> tuple[Any, bool]:
        if type(value) is dt.datetime:
            return value, ((value.tzinfo is not None) == aware
                           and (fraction or not value.microsecond))
        return value, False

    return convert


def _uuid_rule(as_uuid: bool) -> Convert:
    def convert(value: Any) -> tuple[Any, bool]:
        if as_uuid:
            return value, type(value) is uuid.UUID
        if type(value) is str:
            try:
                return value, str(uuid.UUID(value)) == value
            except ValueError:
                return value, False
        return value, False

    return convert


def _exact_types(*types: type) -> ColumnRule:
    return ColumnRule(frozenset((_NONE, *types)), _inexact)


def _plain_rule(type_: TypeEngine[Any], dialect: Dialect) -> ColumnRule:
    """The rule of a type that is not a ``TypeDecorator``."""
    if isinstance(type_, sa.Enum):
        process = type_.bind_processor(dialect)  # type: ignore[no-untyped-call]

        def enum_value(value: Any) -> tuple[Any, bool]:
            try:
                stored = process(value) if process is not None else value
            except LookupError:
                return value, False
            return stored, type(stored) is str

        return ColumnRule(frozenset({_NONE}), enum_value)
    if isinstance(type_, sa.JSON | sa.ARRAY | sa.PickleType):
        return ColumnRule(frozenset({_NONE}), _as_is)
    if isinstance(type_, sa.Interval):
        if _fractions(type_, dialect):
            return _exact_types(dt.timedelta)
        return ColumnRule(frozenset({_NONE}), _whole_seconds)
    if isinstance(type_, sa.Boolean):
        return _exact_types(bool)
    if isinstance(type_, sa.String):
        return _exact_types(str)
    if isinstance(type_, sa.Integer):
        return _exact_types(int)
    if isinstance(type_, sa.Float):
        return ColumnRule(frozenset({_NONE, float, int}), _inexact)
    if isinstance(type_, sa.Numeric):
        return ColumnRule(frozenset({_NONE, int}), _decimal_rule(type_.scale))
    if isinstance(type_, sa.DateTime):
        # PostgreSQL's timestamptz keeps the instant; everywhere else (timestamp, SQLite's
        # text, MariaDB's DATETIME) an offset is dropped or converted: only naive is exact.
        aware = bool(type_.timezone) and dialect.name == "postgresql"
        return ColumnRule(frozenset({_NONE}), _datetime_rule(aware, _fractions(type_, dialect)))
    if isinstance(type_, sa.Date):
        return _exact_types(dt.date)
    if isinstance(type_, sa.Time):
        return ColumnRule(frozenset({_NONE}), _time_rule)
    if isinstance(type_, sa.Uuid):
        return ColumnRule(frozenset({_NONE}), _uuid_rule(bool(type_.as_uuid)))
    if isinstance(type_, sa.LargeBinary):
        return _exact_types(bytes)
    return ColumnRule(frozenset({_NONE}), _as_is)


def _time_rule(value: Any) -> tuple[Any, bool]:
    return value, type(value) is dt.time and value.tzinfo is None


def _whole_seconds(value: Any) -> tuple[Any, bool]:
    return value, type(value) is dt.timedelta and not value.microseconds


def _fractions(type_: TypeEngine[Any], dialect: Dialect) -> bool:
    """Whether the column keeps fractions of a second (MariaDB/MySQL: only with ``fsp``)."""
    return dialect.name != "mysql" or bool(getattr(type_, "fsp", None))


#: SQLAlchemy's own types built as ``TypeDecorator``s on some dialects: their values count as
#: what the application sees (an interval's seconds, a pickled object), not as their encoding.
_OWN_DECORATORS = (sa.Interval, sa.PickleType)


def _overrides(type_: TypeDecorator[Any], name: str) -> bool:
    return getattr(type(type_), name) is not getattr(TypeDecorator, name)


def column_rule(column: sa.Column[Any], dialect: Dialect) -> ColumnRule:
    """The :class:`ColumnRule` of ``column`` on ``dialect``."""
    type_: TypeEngine[Any] = column.type
    binds: list[Callable[[Any], Any]] = []
    for _ in range(8):  # TypeDecorators wrapping TypeDecorators; a loop would be a bug
        if not isinstance(type_, TypeDecorator) or isinstance(type_, _OWN_DECORATORS):
            break
        if _overrides(type_, "bind_expression"):
            # The database applies a SQL function to the value: only reading it back is exact.
            return ColumnRule(frozenset(), _inexact)
        if _overrides(type_, "process_bind_param"):
            binds.append(_bind_param(type_, dialect))
        type_ = type_.load_dialect_impl(dialect)
    rule = _plain_rule(type_, dialect)
    if not binds:
        return rule
    return ColumnRule(frozenset(), _decorated(binds, rule))


def _bind_param(type_: TypeDecorator[Any], dialect: Dialect) -> Callable[[Any], Any]:
    process = type_.process_bind_param

    def bind(value: Any) -> Any:
        return process(value, dialect)

    return bind


def _decorated(binds: list[Callable[[Any], Any]], rule: ColumnRule) -> Convert:
    same = rule.same
    convert = rule.convert

    def stored(value: Any) -> tuple[Any, bool]:
        for bind in binds:
            value = bind(value)
        if type(value) in same:
            return value, True
        return convert(value)

    return stored
