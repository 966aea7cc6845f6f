"""The outbox console: a web page over the outbox tables — the audit trail, failures and
replay, lag and throughput, relays, database-bus consumers.

Run it with ``python -m outbox console`` or mount :func:`create_app` in your ASGI application
(``app.mount("/outbox", create_app(engine, username=…, password=…))``); see docs/console.md.
It needs the ``console`` extra (``pip install 'sqlalchemy-outbox[console]'``: Starlette, Jinja2,
uvicorn).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outbox.exceptions import MissingDependency

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["create_app"]

#: Distributions the console imports, by top-level module.
WEB_MODULES = {"starlette": "starlette", "jinja2": "jinja2", "markupsafe": "jinja2",
               "uvicorn": "uvicorn"}


def require_web() -> None:
    """Raise :class:`MissingDependency` naming the extra when a web package is missing."""
    import importlib.util

    for module, package in WEB_MODULES.items():
        if importlib.util.find_spec(module) is None:
            raise MissingDependency("the console", "console", package)


def create_app(*args: Any, **kwargs: Any) -> Starlette:
    """The console as an ASGI app (arguments: :func:`outbox.console.app.create_app`)."""
    require_web()
    from outbox.console.app import create_app as build

    return build(*args, **kwargs)
