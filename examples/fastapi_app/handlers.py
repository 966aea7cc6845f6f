"""Handlers the relay runs: ``python -m outbox.relay --app fastapi_app.handlers``.

Imported by the relay only (the web process never runs handlers). The inbox row makes the
effect exactly-once: a redelivered event finds its row and changes nothing.
"""

from __future__ import annotations

from sqlmodel import Session

import outbox
from fastapi_app.db import engine
from fastapi_app.models import Activity
from outbox.inbox import record


@outbox.subscribe("public.item.create")
def record_activity(event: outbox.Event) -> None:
    # Changes made here are attributed to the user who caused the event.
    with outbox.context(user_id=event.user_id), Session(engine) as session:
        if not record(session, "activity", event.id):
            return  # handled before (a retry after a crash)
        session.add(Activity(user_id=event.payload["owner_id"],
                             text=f"created item {event.payload['title']!r}"))
        session.commit()
