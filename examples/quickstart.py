"""The embedded default in one file: commit → events table → relay → handler.

    python examples/quickstart.py

SQLite file ``outbox.db`` in the working directory (the relay's embedded default), one model,
``outbox.capture`` on the sessionmaker. The user row and its event rows commit together; the
password never reaches an event. Then the relay delivers the committed events to the handler
below (the same as running ``python -m outbox.relay --once --app yourmodule`` in this directory,
with the memory provider) and marks them ``completed``.
"""

from __future__ import annotations

import json

import anyio
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

import outbox


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    password: Mapped[str]


@outbox.subscribe("main.users.>")  # SQLite's schema is "main": main.users.create, ...update
def on_user_change(event: outbox.Event) -> None:
    """A handler: runs in the relay after the event committed (at least once, in order per row)."""
    print(f"handler: {event.type} {event.entity_id} {event.payload}")


def main() -> None:
    engine = sa.create_engine("sqlite:///outbox.db")
    outbox.create_schema(engine)  # SQLite only; other databases: alembic upgrade head
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine)
    outbox.capture(Session, exclude={User: {"password"}})  # once, at start-up

    with Session() as session:
        last_seq = session.scalar(sa.select(sa.func.max(outbox.Event.seq))) or 0
        with outbox.context(user_id=42):  # who is acting, e.g. set by web middleware
            user = User(name="Ada", password="s3cret")
            session.add(user)
            session.commit()  # INSERT users + INSERT events, one transaction
            user.name = "Ada Lovelace"
            session.commit()  # UPDATE users + its event, with the changed columns

        events = session.scalars(
            sa.select(outbox.Event).where(outbox.Event.seq > last_seq).order_by(outbox.Event.seq)
        )
        for event in events:
            print(json.dumps({
                "seq": event.seq,
                "type": event.type,
                "entity_id": event.entity_id,
                "user_id": event.user_id,
                "status": event.status,
                "payload": event.payload,
                "metadata": event.meta,
            }))

    # The relay: claim the committed events, run the handlers, forward to the provider (memory),
    # mark them completed. A sidecar does the same continuously: python -m outbox.relay
    anyio.run(outbox.Relay("sqlite:///outbox.db").drain)
    with Session() as session:
        statuses = session.execute(
            sa.select(outbox.Event.status, sa.func.count()).where(outbox.Event.seq > last_seq)
            .group_by(outbox.Event.status)
        ).all()
        print("events now:", dict(statuses))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
