"""The framework integrations import their framework lazily and say which extra is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("outbox.fastapi", "fastapi", "fastapi"),
    ("outbox.flask", "flask", "flask"),
])
def test_a_missing_framework_names_the_extra(module: str, framework: str, extra: str) -> None:
    code = (f"import sys; sys.modules[{framework!r}] = None\n"
            "import outbox, outbox.asgi  # neither needs the framework\n"
            f"try:\n    import {module}\nexcept outbox.exceptions.MissingDependency as exc:\n"
            "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"pip install 'sqlalchemy-outbox[{extra}]'" in done.stdout


def test_importing_outbox_loads_no_framework() -> None:
    code = ("import sys, outbox, outbox.asgi\n"
            "print(sorted(m for m in ('fastapi', 'flask', 'starlette') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
