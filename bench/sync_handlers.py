"""The application of the relay benchmark's handler-style runs: the README's style, a plain
``def`` handler (run in worker threads, the default), for every event.

    PYTHONPATH=bench python -m outbox.relay --app sync_handlers --once --batch-size 500
"""

from __future__ import annotations

import outbox


@outbox.subscribe("*")
def noop(event: outbox.Event) -> None:
    return None
