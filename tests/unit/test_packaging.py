"""The distribution name: pyproject, the package and every install command in the docs agree.

``outbox`` on the package registry is an unrelated project, so a doc that says ``pip install
outbox`` (or ``'outbox[postgres]'``) installs someone else's code; these tests keep every install
command on the name ``pyproject.toml`` declares.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path

import pytest

import outbox
from outbox._meta import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("examples/**/*.md")])
# "pip install ..." up to the end of the line, a shell comment or the end of inline code.
_INSTALL = re.compile(r"pip install ([^`#\n]+)")


def test_pyproject_names_the_distribution_the_package_reports() -> None:
    assert PYPROJECT["project"]["name"] == DISTRIBUTION == "sqlalchemy-outbox"
    assert importlib.metadata.version(DISTRIBUTION) == outbox.__version__


def test_the_extras_refer_to_the_distribution_itself() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    self_refs = [req for reqs in extras.values() for req in reqs
                 if re.match(r"[A-Za-z0-9_.-]*outbox\[", req)]
    assert self_refs and all(req.startswith(f"{DISTRIBUTION}[") for req in self_refs)


def _names(command: str) -> list[str]:
    """The distribution names a ``pip install`` command's arguments ask for."""
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    requirements = [w for w in words if not w.startswith("-") and w not in (".", "..")]
    return [re.split(r"[\[<>=!~;@ ]", r, maxsplit=1)[0] for r in requirements]


def test_every_install_command_in_the_docs_names_the_distribution() -> None:
    found = []
    for path in DOCS:
        for match in _INSTALL.finditer(path.read_text()):
            found.extend((path.relative_to(ROOT), name) for name in _names(match[1]))
    ours = [(where, name) for where, name in found if "outbox" in name.lower()]
    assert ours, "no install command names the package"
    wrong = [f"{where}: {name}" for where, name in ours if name != DISTRIBUTION]
    assert not wrong, f"install commands naming another distribution: {wrong}"
    assert (Path("README.md"), DISTRIBUTION) in ours


@pytest.mark.parametrize("text", ["pip install outbox", "pip install 'outbox[redis]'",
                                  "pip install -U outbox==0.1.8"])
def test_the_check_catches_the_wrong_name(text: str) -> None:
    (command,) = _INSTALL.findall(text)
    assert _names(command) == ["outbox"]
