"""The application of the relay benchmark's handler-style runs: a plain ``def`` handler called
on the event loop (``threaded=False``), for every event.

    PYTHONPATH=bench python -m outbox.relay --app inline_handlers --once --batch-size 500
"""

from __future__ import annotations

import outbox


@outbox.subscribe("*", threaded=False)
def noop(event: outbox.Event) -> None:
    return None
