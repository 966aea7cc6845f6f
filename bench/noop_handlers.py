"""The application the relay benchmarks run: one no-op handler for every event.

    PYTHONPATH=bench python -m outbox.relay --app noop_handlers --once --batch-size 500
"""

from __future__ import annotations

import outbox


@outbox.subscribe("*")
async def noop(event: outbox.Event) -> None:
    return None
