"""The distributions as built: the wheel carries the package (migrations, console files, types),
the sdist also the docs, examples and tests; both are named and versioned as the package says."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import outbox
from outbox._meta import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                           str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_the_wheel_carries_the_package_and_its_data(built: Path) -> None:
    (wheel,) = built.glob("*.whl")
    stem = f"{DISTRIBUTION.replace('-', '_')}-{outbox.__version__}"
    assert wheel.name.startswith(f"{stem}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{stem}.dist-info/METADATA").decode()
    revisions = sorted(p.name for p in (ROOT / "outbox/migrations/versions").glob("outbox_*.py"))
    assert revisions and {f"outbox/migrations/versions/{r}" for r in revisions} <= names
    assert {"outbox/py.typed", "outbox/__init__.py"} <= names
    assert any(n.startswith("outbox/console/templates/") for n in names)
    assert any(n.startswith("outbox/console/static/") for n in names)
    assert not any(n.startswith(("tests/", "docs/", "examples/", "bench/")) for n in names)
    assert f"Name: {DISTRIBUTION}\n" in metadata and f"Version: {outbox.__version__}\n" in metadata
    assert "License-Expression: MIT" in metadata


def test_the_sdist_carries_docs_examples_and_tests(built: Path) -> None:
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "docs", "examples", "tests", "migrations"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:  # not a git checkout (an unpacked sdist): what is here must be in it
        tracked = [str(p.relative_to(ROOT)) for d in ("docs", "examples", "tests")
                   for p in (ROOT / d).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    missing = sorted(set(tracked) - names)
    assert not missing, f"not in the sdist: {missing[:10]}"
    assert {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "alembic.ini"} <= names
