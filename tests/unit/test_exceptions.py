"""One exception root: every error outbox raises on purpose is defined in outbox/exceptions.py."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import outbox
from outbox import exceptions

# Modules that need an optional driver or a web framework to import.
OPTIONAL = ("outbox.fastapi", "outbox.flask", "outbox.console.app", "outbox.console.views")


def outbox_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(outbox.__path__, "outbox.")]
    return [n for n in names if ".migrations.versions." not in n and not n.endswith("__main__")]


def test_every_outbox_error_is_defined_in_exceptions() -> None:
    elsewhere = set()
    for name in outbox_modules():
        try:
            module = importlib.import_module(name)
        except ImportError:
            assert name.startswith(OPTIONAL), name
            continue
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, exceptions.OutboxError)
                    and value.__module__ != "outbox.exceptions"):
                elsewhere.add(f"{value.__module__}.{value.__qualname__}")
    assert not elsewhere, sorted(elsewhere)
    assert set(exceptions.__all__) == {
        n for n, v in vars(exceptions).items()
        if isinstance(v, type) and issubclass(v, exceptions.OutboxError)
    }


@pytest.mark.parametrize(("module", "name"), [
    ("outbox.providers.base", "EventNotFound"),
    ("outbox.inbox", "NoInboxTransaction"),
    ("outbox.migrations", "MigrationError"),
    ("outbox.relay", "DatabaseUnavailable"),
    ("outbox.relay.relay", "DatabaseUnavailable"),
])
def test_moved_classes_stay_importable_where_they_were(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is getattr(exceptions, name)
