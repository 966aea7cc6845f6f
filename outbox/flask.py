"""Flask: every request gets its own outbox context; optional callables give the acting user.

::

    outbox.flask.init_app(app, user_id=lambda: current_user.get_id())

Each request runs inside :func:`outbox.request_scope`. The callables are called at the start of
each request, before the application's own ``before_request`` hooks, so they must find the user
themselves (Flask-Login's ``current_user`` does); code that authenticates later — a hook, a view
decorator — calls ``outbox.set_context(user_id=…)`` instead, which holds for the rest of the
request. Needs ``pip install 'sqlalchemy-outbox[flask]'``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from outbox._context import request_scope
from outbox.exceptions import MissingDependency

try:
    import flask
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependency("outbox.flask", "flask", "flask") from exc

__all__ = ["init_app"]

_KEY = "_outbox_request_scope"


def init_app(
    app: flask.Flask,
    *,
    user_id: Callable[[], Any] | None = None,
    session_id: Callable[[], Any] | None = None,
    metadata: Callable[[], Mapping[str, Any] | None] | None = None,
) -> None:
    """Open a request scope at the start of every request of ``app``, close it at teardown."""

    def open_scope() -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(request_scope(
            user_id=user_id() if user_id else None,
            session_id=session_id() if session_id else None,
            metadata=metadata() if metadata else None,
        ))
        setattr(flask.g, _KEY, stack)

    def close_scope(_exc: BaseException | None) -> None:
        stack: contextlib.ExitStack | None = flask.g.pop(_KEY, None)
        if stack is not None:
            stack.close()

    # First: the application's own hooks may call outbox.set_context().
    app.before_request_funcs.setdefault(None, []).insert(0, open_scope)
    app.teardown_request(close_scope)
