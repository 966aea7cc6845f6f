"""FastAPI: make the user your authentication dependency returns the acting user of the request.

::

    from outbox.fastapi import acting_user

    CurrentUser = Annotated[User, Depends(acting_user(get_current_user))]

``acting_user(dep)`` is a dependency that depends on ``dep`` (sync or async, ``yield`` or not),
returns what it returns, and sets ``user_id`` (``user.id`` by default) for the events of the
request. With :class:`outbox.asgi.ContextMiddleware` installed the user stays set until the
request ends — also for a session dependency that commits when it exits; without it, until this
dependency exits (docs/fastapi.md). Needs ``pip install 'sqlalchemy-outbox[fastapi]'``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from outbox._context import in_request_scope, request_scope, set_context
from outbox.exceptions import MissingDependency, OutboxError

try:
    from fastapi import Depends
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("outbox.fastapi", "fastapi", "fastapi") from exc

__all__ = ["acting_user"]

T = TypeVar("T")

_PLAIN_IDS = (str, int, uuid.UUID)


def acting_user(
    dependency: Callable[..., Any],
    *,
    user_id: Callable[[Any], Any] | None = None,
    session_id: Callable[[Any], Any] | None = None,
) -> Callable[..., AsyncIterator[Any]]:
    """A dependency returning ``dependency``'s value with its user as the acting user.

    ``user_id`` maps that value to the id stored in events (default: the value itself when it is
    a str/int/UUID, else its ``id`` attribute; ``None`` means anonymous). ``session_id``
    likewise, default none.
    """
    name = getattr(dependency, "__qualname__", repr(dependency))

    def ident(user: Any) -> Any:
        if user_id is not None:
            return user_id(user)
        if user is None or isinstance(user, _PLAIN_IDS):
            return user
        try:
            return user.id
        except AttributeError:
            raise OutboxError(
                f"outbox.fastapi.acting_user({name}): {type(user).__qualname__} has no 'id'; "
                "pass user_id=lambda user: ... to say which value identifies the user"
            ) from None

    # Async, so that FastAPI runs it in the request's own task: what it sets is seen by the
    # endpoint and by everything after it (a sync dependency runs in a copied context).
    async def acting(user: Any = Depends(dependency)) -> AsyncIterator[Any]:
        values = {"user_id": ident(user),
                  "session_id": session_id(user) if session_id is not None else None}
        if in_request_scope():
            set_context(**values)
            yield user
        else:
            with request_scope(**values):
                yield user

    acting.__qualname__ = acting.__name__ = f"acting_user({name})"
    return acting
