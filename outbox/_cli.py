"""Pieces the command-line entry points share (``python -m outbox``, ``python -m outbox.relay``,
``python -m outbox.consume``).

They load the config the same way (defaults < file < ``OUTBOX_*`` environment < flags), the
sidecars import the ``--app`` modules (and the config's ``apps``) so their handlers register, and
each reports a problem as one line on stderr (:class:`Failure`, :func:`print_error`: credentials
in URLs hidden), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from outbox._redact import redact
from outbox.exceptions import ConfigError, OutboxError

if TYPE_CHECKING:
    from outbox.config import Config

__all__ = ["ConfigFailure", "Failure", "add_metrics_arguments", "import_apps", "leaves",
           "load_config", "print_error", "print_warning", "warn_unknown_variables"]


class Failure(Exception):
    """The command cannot do its job: one line on stderr (a line per problem), no traceback.

    The exit code is the command's: 2 for the sidecars (every such error is a start-up error),
    1 for ``python -m outbox`` (2 is its bad usage, :class:`ConfigFailure` included).
    """


class ConfigFailure(Failure):
    """The configuration (file, ``OUTBOX_*`` variables, flags) is wrong: bad usage, exit 2 in
    every command. The message has a line per problem."""


_warned: set[str] = set()


def print_warning(message: object) -> None:
    """``warning: message`` on stderr, once per process, credentials in URLs hidden."""
    text = redact(str(message))
    if text not in _warned:
        _warned.add(text)
        print(f"warning: {text}", file=sys.stderr)


def warn_unknown_variables(env: Mapping[str, str]) -> None:
    """A warning line for each ``OUTBOX_*`` variable in ``env`` that is no setting (a typo)."""
    from outbox.config import unknown_variables

    for warning in unknown_variables(env):
        print_warning(warning)


def print_error(message: object, prog: str | None = None) -> None:
    """``[prog: ]error: message`` on stderr, a line each for a message of several lines,
    credentials in URLs hidden."""
    lead = f"{prog + ': ' if prog else ''}error: "
    for line in redact(str(message)).splitlines() or [""]:
        print(f"{lead}{line}", file=sys.stderr)


def load_config(path: str | None, env: Mapping[str, str],
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The config from ``path`` (else ``$OUTBOX_CONFIG``, else defaults) and ``env``, with the
    flags' ``overrides`` (dotted keys; ``None`` values are ignored) applied and validated."""
    from outbox.config import Config

    path = path or env.get("OUTBOX_CONFIG") or None
    where = f"config {path}" if path else "config"
    warn_unknown_variables(env)
    try:
        config = Config.load(path, env=env, warn_unknown=False)
        return config.with_overrides(dict(overrides)) if overrides else config
    except ConfigError as exc:
        raise ConfigFailure("\n".join(f"{where}: {p}" for p in exc.problems)) from None
    except OutboxError as exc:
        raise ConfigFailure(f"{where}: {exc}") from None
    except OSError as exc:
        raise ConfigFailure(f"cannot read config {path}: {exc.strerror or exc}") from None


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port``/``--metrics-host`` for a sidecar; they override the config's
    ``metrics.port``/``metrics.host`` (pass them to :func:`load_config` under those keys)."""
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve /metrics, /healthz, /readyz on this port (0: any free port; "
                             "config metrics.port)")
    parser.add_argument("--metrics-host", metavar="HOST",
                        help="address for --metrics-port (config metrics.host, default "
                             "127.0.0.1)")


def import_apps(modules: Sequence[str]) -> None:
    """Import ``modules`` (``--app``) so their ``@outbox.subscribe`` handlers register."""
    if os.getcwd() not in sys.path:  # like `python -m`: app modules next to the working dir
        sys.path.insert(0, os.getcwd())
    for module in dict.fromkeys(modules):
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise Failure(f"--app {module}: cannot import: {type(exc).__name__}: {exc}") \
                from None


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside a (nested) exception group, or ``[error]``: what to report when a
    task group fails."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for sub in error.exceptions for leaf in leaves(sub)]
    return [error]
