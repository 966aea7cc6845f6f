"""Capture with several sessions and threads at once: each transaction gets its own events."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import outbox
from tests.integration.capture_models import Db, User, make_db


@pytest.fixture(params=["postgresql", "mariadb"])
def db(request: pytest.FixtureRequest) -> Iterator[Db]:
    # SQLite has a single writer: two open write transactions cannot coexist there.
    url = request.getfixturevalue("pg_url" if request.param == "postgresql" else "mariadb_url")
    yield from make_db(url)


def _ids(db: Db, names: list[str]) -> dict[str, int]:
    with db.Session() as s:
        users = {n: User(name=n) for n in names}
        s.add_all(users.values())
        s.commit()
        ids = {n: u.id for n, u in users.items()}
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events"))
    return ids


def _run(*targets: threading.Thread) -> None:
    for t in targets:
        t.start()
    for t in targets:
        t.join(30)
        assert not t.is_alive()


def test_two_sessions_changing_different_rows(db: Db) -> None:
    ids = _ids(db, ["a", "b"])
    barrier = threading.Barrier(2, timeout=20)
    errors: list[BaseException] = []

    def work(name: str, commit: bool, email: str) -> None:
        try:
            with outbox.context(user_id=name), db.Session() as s:
                user = s.get(User, ids[name])
                assert user is not None
                user.email = email
                s.flush()  # both transactions now hold an uncommitted event row
                barrier.wait()
                if commit:
                    s.commit()
                else:
                    s.rollback()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    _run(threading.Thread(target=work, args=("a", True, "a@1")),
         threading.Thread(target=work, args=("b", False, "b@1")))
    assert not errors
    events = db.events()
    assert [(e.entity_id, e.user_id, e.meta["changes"]) for e in events] == [
        (str(ids["a"]), "a", {"email": {"old": None, "new": "a@1"}})
    ]

    # Both commit: each gets exactly its own event, attributed to its own thread's user.
    barrier.reset()
    _run(threading.Thread(target=work, args=("a", True, "a@2")),
         threading.Thread(target=work, args=("b", True, "b@2")))
    assert not errors
    later = {(e.entity_id, e.user_id, e.payload["email"]) for e in db.events()[1:]}
    assert later == {(str(ids["a"]), "a", "a@2"), (str(ids["b"]), "b", "b@2")}
    assert db.count() == 3


def test_context_does_not_leak_between_threads(db: Db) -> None:
    seen: list[BaseException] = []

    def plain(name: str) -> None:  # a new thread starts with an empty context
        try:
            with db.Session() as s:
                s.add(User(name=name))
                s.commit()
        except BaseException as exc:  # pragma: no cover
            seen.append(exc)

    def with_context(name: str) -> None:
        try:
            with outbox.context(user_id=name, session_id=f"s-{name}"), db.Session() as s:
                s.add(User(name=name))
                s.commit()
        except BaseException as exc:  # pragma: no cover
            seen.append(exc)

    with outbox.context(user_id="outer"):
        _run(*[threading.Thread(target=with_context, args=(f"t{i}",)) for i in range(4)],
             threading.Thread(target=plain, args=("anon",)))
    assert not seen
    by_name = {e.payload["name"]: (e.user_id, e.session_id) for e in db.events()}
    assert by_name == {
        **{f"t{i}": (f"t{i}", f"s-t{i}") for i in range(4)},
        "anon": (None, None),
    }
