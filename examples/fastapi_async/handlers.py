"""Handlers the relay runs: ``python -m outbox.relay --app fastapi_async.handlers``.

Imported by the relay only (the web process never runs handlers). An ``async def`` handler runs
on the relay's event loop, so it uses the application's own ``AsyncSession``; the inbox row,
written by ``record_async`` in the handler's transaction, makes its effect exactly-once.
"""

from __future__ import annotations

import outbox
from fastapi_async.db import SessionLocal
from fastapi_async.models import Activity
from outbox.inbox import record_async


@outbox.subscribe("public.items.create")
async def record_activity(event: outbox.Event) -> None:
    # What the handler writes is attributed to the user who caused the event.
    with outbox.context(user_id=event.user_id):
        async with SessionLocal() as session:
            if not await record_async(session, "activity", event.id):
                return  # handled before (a retry after a crash)
            session.add(Activity(user_id=event.payload["owner_id"],
                                 text=f"created item {event.payload['title']!r}"))
            await session.commit()
