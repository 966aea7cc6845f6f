"""Start-up pieces the sidecars share (``python -m outbox.relay``, ``python -m outbox.consume``).

Both load the config the same way (defaults < file < ``OUTBOX_*`` environment < flags), import
the ``--app`` modules (and the config's ``apps``) so their handlers register, and report a start-up
problem as one line on stderr with exit code 2 (:class:`Failure`), never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from outbox.exceptions import OutboxError

if TYPE_CHECKING:
    from outbox.config import Config

__all__ = ["Failure", "import_apps", "leaves", "load_config"]


class Failure(Exception):
    """A start-up error: one line on stderr, exit code 2."""


def load_config(path: str | None, env: Mapping[str, str],
                overrides: Mapping[str, Any] | None = None) -> Config:
    """The config from ``path`` (else ``$OUTBOX_CONFIG``, else defaults) and ``env``, with the
    flags' ``overrides`` (dotted keys; ``None`` values are ignored) applied and validated."""
    from outbox.config import Config

    try:
        config = Config.load(path or env.get("OUTBOX_CONFIG") or None, env=env)
        return config.with_overrides(dict(overrides)) if overrides else config
    except OutboxError as exc:
        raise Failure(f"config: {exc}") from None
    except OSError as exc:
        raise Failure(f"cannot read config {path}: {exc.strerror or exc}") from None


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
