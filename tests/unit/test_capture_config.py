"""capture() refuses bad input at the call, before any session runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outbox
from outbox.events import Event
from outbox.testing import captures


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "cfg_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    login: Mapped[str]
    secret: Mapped[str] = mapped_column("secret_hash")


class Credential(Base):
    __tablename__ = "cfg_credentials"

    api_key: Mapped[str] = mapped_column(primary_key=True)
    owner: Mapped[str]


class Other(Base):
    __tablename__ = "cfg_other"

    id: Mapped[int] = mapped_column(primary_key=True)


class NotMapped:
    pass


@pytest.fixture
def factory() -> Iterator[sessionmaker[Session]]:
    yield sessionmaker()
    for handle in captures():  # nothing registered by these tests may leak
        handle.remove()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"models": [NotMapped]}, "NotMapped is not a mapped class"),
        ({"models": NotMapped}, "neither a mapped class nor a declarative base"),
        ({"models": []}, "empty"),
        ({"models": "Account"}, "must be a collection"),
        ({"models": [Event]}, "outbox table"),
        ({"operations": ("create", "upsert")}, "unknown operation 'upsert'"),
        ({"operations": ()}, "empty"),
        ({"operations": "create"}, "must be a collection"),
        ({"exclude": {Account: {"password"}}}, r"Account has no column 'password' \(columns: "),
        ({"exclude": {Account: "secret"}}, "must be a collection"),
        ({"exclude": {NotMapped: {"x"}}}, "NotMapped is not a mapped class"),
        ({"models": [Account], "exclude": {Other: {"id"}}}, "Other is not captured"),
        ({"include": {Account: {"pin"}}}, r"Account has no column 'pin'"),
        ({"models": [Credential]}, r"Credential: its primary key 'api_key' looks like a "
                                   r"secret, yet it would be every event's entity_id"),
        ({"models": [Account], "exclude": {Account: {"id"}}},
         r"primary key 'id' is in exclude="),
        ({"include": {Account: {"secret"}}, "exclude": {Account: {"secret"}}},
         r"Account.secret is in both exclude= and include="),
    ],
)
def test_bad_arguments(factory: sessionmaker[Session], kwargs: dict[str, object],
                       message: str) -> None:
    with pytest.raises(outbox.exceptions.CaptureError, match=message):
        outbox.capture(factory, **kwargs)  # type: ignore[arg-type]
    assert captures() == []  # nothing half-registered


def test_bad_targets() -> None:
    for target in (object(), sa.create_engine("sqlite://").dialect, "Session", Account):
        with pytest.raises(outbox.exceptions.CaptureError, match="needs a Session class"):
            outbox.capture(target)
    scoped = sa.orm.scoped_session(lambda: Session())
    with pytest.raises(outbox.exceptions.CaptureError, match="not a sessionmaker"):
        outbox.capture(scoped)


def test_exclude_accepts_column_or_attribute_names(factory: sessionmaker[Session]) -> None:
    by_column = outbox.capture(factory, exclude={Account: {"secret_hash"}})
    plan = by_column.plan(sa.inspect(Account))
    assert plan is not None
    assert [name for _, name in plan.cols] == ["id", "login"]
    by_column.remove()
    by_attribute = outbox.capture(factory, exclude={Account: {"secret"}})
    plan = by_attribute.plan(sa.inspect(Account))
    assert plan is not None and [name for _, name in plan.cols] == ["id", "login"]


def test_outbox_tables_are_never_captured(factory: sessionmaker[Session]) -> None:
    handle = outbox.capture(factory)
    assert handle.plan(sa.inspect(Event)) is None
    assert handle.plan(sa.inspect(Account)) is not None


def test_operations_accept_the_enum(factory: sessionmaker[Session]) -> None:
    handle = outbox.capture(factory, operations=[outbox.events.Operation.CREATE, "delete"])
    assert handle.operations == {"create", "delete"}


def test_secret_looking_columns_are_excluded_unless_included(
    factory: sessionmaker[Session],
) -> None:
    default = outbox.capture(factory)
    plan = default.plan(sa.inspect(Account))
    assert plan is not None
    assert [name for _, name in plan.cols] == ["id", "login"]  # secret_hash looks like one
    assert plan.secret_names == ("secret_hash",)
    default.remove()
    kept = outbox.capture(factory, include={Account: {"secret_hash"}})
    plan = kept.plan(sa.inspect(Account))
    assert plan is not None and [name for _, name in plan.cols] == ["id", "login", "secret_hash"]


@pytest.mark.parametrize(("name", "secret"), [
    ("password", True), ("hashed_password", True), ("passwordHash", True), ("api_key", True),
    ("apiKey", True), ("APIKey", True), ("refresh_token", True), ("totp_secret", True),
    ("salt", True), ("session_key", True), ("private_key_pem", True),
    ("name", False), ("email", False), ("session_id", False), ("partition_key", False),
    ("idempotency_key", False), ("tokens_used", False), ("is_superuser", False),
    ("passage", False), ("secretary_id", False),
])
def test_which_names_look_like_secrets(name: str, secret: bool) -> None:
    from outbox._secret_names import looks_secret

    assert looks_secret(name) is secret
