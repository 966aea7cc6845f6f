"""Read events (opt-in): published after load through the default broker, not transactional."""

from __future__ import annotations

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

import outbox
from outbox.broker import Broker, set_default_broker
from outbox.events import Event
from tests.integration.capture_models import Base, Tag, User

pytestmark = pytest.mark.anyio


async def test_loaded_rows_are_submitted_to_the_default_broker(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    outbox.create_schema(engine)
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine)
    handle = outbox.capture(factory, models=[User], operations=("create", "read"),
                            exclude={User: {"password"}})
    broker = Broker(sync_handlers="inline")
    got: list[Event] = []
    arrived = anyio.Event()

    def handler(event: Event) -> None:
        got.append(event)
        arrived.set()

    broker.subscribe("main.cap_users.read", handler)
    previous = set_default_broker(broker, inherit=False)
    try:
        with factory() as s:
            s.add_all([User(name="a", password="secret"), Tag(owner_id=1, name="t")])
            s.commit()
        # Without a running broker, opting into read events is a loud error, not a silent drop.
        with factory() as s, pytest.raises(outbox.exceptions.BrokerNotStarted):
            s.scalars(sa.select(User)).all()

        await broker.start()
        with outbox.context(user_id="reader"), factory() as s:
            users = s.scalars(sa.select(User)).all()
            s.scalars(sa.select(Tag)).all()  # not a captured model
            assert [u.name for u in users] == ["a"]
        with anyio.fail_after(10):
            await arrived.wait()
    finally:
        await broker.stop()
        set_default_broker(previous, inherit=False)
        handle.remove()
    [ev] = got
    assert (ev.type, ev.operation, ev.entity, ev.user_id) == (
        "main.cap_users.read", "read", "cap_users", "reader")
    assert ev.payload == {"id": users[0].id, "name": "a", "email": None}
    # Read events never enter the events table; only the create does.
    with sa.orm.Session(engine) as s:
        assert [e.operation for e in s.scalars(sa.select(Event))] == ["create"]
    engine.dispose()
