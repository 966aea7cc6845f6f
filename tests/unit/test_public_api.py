"""The package root: a small public API, and the names it no longer carries still found."""

from __future__ import annotations

import importlib

import pytest

import outbox


def test_the_root_is_small_and_every_name_resolves() -> None:
    assert len(outbox.__all__) <= 28
    assert sorted(outbox.__all__) == sorted(set(outbox.__all__))
    for name in outbox.__all__:
        assert getattr(outbox, name) is not None, name
    assert sorted(dir(outbox)) == sorted(outbox.__all__)


@pytest.mark.parametrize("name", sorted(outbox._MOVED))
def test_a_moved_name_is_found_with_a_warning_naming_its_home(name: str) -> None:
    home = outbox._MOVED[name]
    with pytest.warns(DeprecationWarning, match=rf"outbox\.{name} is {home}\.{name} now"):
        value = getattr(outbox, name)
    assert value is getattr(importlib.import_module(home), name)
    assert name not in outbox.__all__


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        outbox.Nope  # noqa: B018


def test_a_public_submodule_is_an_attribute_of_the_package() -> None:
    """``outbox.sqlite.sqlite_savepoints`` works after a plain ``import outbox``; private
    names are not looked up as modules."""
    assert getattr(outbox, "sqlite") is importlib.import_module("outbox.sqlite")  # noqa: B009
    with pytest.raises(AttributeError):
        outbox._nope  # noqa: B018
