"""ASGI middleware that gives every request its own outbox context (FastAPI, Starlette, …).

::

    app.add_middleware(outbox.asgi.ContextMiddleware)

Each HTTP and WebSocket request runs inside :func:`outbox.request_scope`, so the acting user set
anywhere in the request — ``outbox.set_context(user_id=…)`` in an authentication dependency, or a
``with outbox.context(...)`` block in a sync ``yield`` dependency that the framework runs in worker
threads — is on every event the request writes, background tasks included, and on none of any
other request. Optional callables take the ASGI scope and return values for the whole request,
e.g. ``user_id=lambda scope: scope["user"].identity`` behind Starlette's
``AuthenticationMiddleware``. A pure ASGI middleware: no extra dependency, nothing buffered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from outbox._context import request_scope

__all__ = ["ContextMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUESTS = ("http", "websocket")


class ContextMiddleware:
    """Open a request scope around each request (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        user_id: Callable[[Scope], Any] | None = None,
        session_id: Callable[[Scope], Any] | None = None,
        metadata: Callable[[Scope], Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.app = app
        self.user_id = user_id
        self.session_id = session_id
        self.metadata = metadata

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _REQUESTS:
            await self.app(scope, receive, send)
            return
        with request_scope(
            user_id=self.user_id(scope) if self.user_id else None,
            session_id=self.session_id(scope) if self.session_id else None,
            metadata=self.metadata(scope) if self.metadata else None,
        ):
            await self.app(scope, receive, send)
