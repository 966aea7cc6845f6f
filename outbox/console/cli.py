"""``python -m outbox console``: serve the console with uvicorn.

::

    python -m outbox console [--database-url URL] [--config PATH] [--host 127.0.0.1]
        [--port 8765] [--read-only] [--no-auth]

The database comes as for every ``python -m outbox`` command; the rest from the config's
``console:`` section and ``OUTBOX_CONSOLE_*`` (``TOKEN``, ``USERNAME``, ``PASSWORD``, ``SECRET``,
``HOST``, ``PORT``, ``READ_ONLY``, ``REDACT``, ``PAGE_SIZE``, ``QUERY_TIMEOUT``); flags
win. Credentials are never flags (a command line is visible to every user of the machine).
Without credentials it refuses to start unless told ``--no-auth`` and bound to a loopback
address. This module imports no web package: the ``console`` extra is needed only when the
command runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
from collections.abc import Callable
from typing import IO, Any

from sqlalchemy.engine import Engine

from outbox._cli import Failure, load_config
from outbox.exceptions import OutboxError

__all__ = ["add_parser", "run"]


def add_parser(commands: Any, common: Callable[..., None]) -> None:
    """The ``console`` sub-command of ``python -m outbox``."""
    p = commands.add_parser(
        "console", help="serve the web console",
        description="Serve the web console: the events trail, failures and replay, health. "
        "Credentials come from the config's console section or OUTBOX_CONSOLE_TOKEN / "
        "OUTBOX_CONSOLE_USERNAME + OUTBOX_CONSOLE_PASSWORD.",
    )
    common(p, top=False)
    p.add_argument("--host", metavar="HOST",
                   help="address to listen on (default 127.0.0.1; config console.host)")
    p.add_argument("--port", type=int, metavar="PORT",
                   help="port (default 8765, 0 for any free one; config console.port)")
    p.add_argument("--read-only", action="store_true",
                   help="show everything, change nothing (no replays)")
    p.add_argument("--no-auth", action="store_true",
                   help="no sign-in: only with no credentials configured and a loopback --host")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    """Build the console from the config and flags and serve it until SIGINT/SIGTERM."""
    overrides: dict[str, Any] = {"console.host": args.host, "console.port": args.port}
    if args.read_only:
        overrides["console.read_only"] = True
    settings = load_config(args.config, os.environ, overrides).console  # bad: exit 2

    from outbox.console import require_web
    from outbox.console.app import _loopback_host

    if args.no_auth and not _loopback_host(settings.host):
        raise ValueError(f"--no-auth serves only a loopback address, not {settings.host!r}")
    require_web()
    from outbox.console.app import create_app, started

    try:
        app = create_app(
            engine, token=settings.token, username=settings.username,
            password=settings.password, no_auth=args.no_auth, read_only=settings.read_only,
            redact=settings.redact, secret=settings.secret, page_size=settings.page_size,
            query_timeout=settings.query_timeout,
        )
    except (OutboxError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    sock = _listen(settings.host, settings.port)
    port = sock.getsockname()[1]
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    mode = "read-only" if settings.read_only else "replays allowed"
    out.write(f"outbox console on http://{shown}:{port}/ ({started(app.state.console)}; "
              f"{mode}); Ctrl-C stops it\n")
    out.flush()
    try:
        _serve(app, sock)
    finally:
        sock.close()
        app.state.console.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it a response written in two parts waits for the client's delayed ACK (40 ms
    # per request on a kept-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _serve(app: Any, sock: socket.socket) -> None:
    import anyio
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                            server_header=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down: make SIGTERM end
    # the command like Ctrl-C does (exit 0) instead of killing the process.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        anyio.run(server.serve, [sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
