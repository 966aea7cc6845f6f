"""The docs name only what exists: files, modules, ``outbox.`` attributes, CLI commands and flags,
configuration keys and variables, Markdown links and their anchors, the revision for new apps.

Docs drift when code moves; each check below reads every Markdown file of the repository (README,
docs/, CHANGELOG, examples/) and fails naming the file and what it names that is gone.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import outbox
import outbox.migrations
from outbox.config import Config, _variables

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("docs/*.md"),
               *ROOT.glob("examples/**/*.md")])

_CODE_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*(?:\.(?:py|md|ini|toml|yaml|yml|cfg|html)|/)"
                   r"(?:::\w+)?")
_ATTRIBUTE = re.compile(r"(?<![\w.])outbox(?:\.[A-Za-z_]\w*)+")
_VARIABLE = re.compile(r"\bOUTBOX_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
_COMMAND = re.compile(r"python -m (outbox(?:\.[a-z_.]+)?)([^\n`|#]*)")
#: names shaped like ``outbox.<name>`` that are not Python attributes
_NOT_ATTRIBUTES = {
    "outbox.notify",  # the PostgreSQL setting writers read (SET outbox.notify = off)
    "outbox.db",  # the embedded default's SQLite file
    "outbox.events",  # the Redis stream name prefix in examples (outbox:events is the default)
    "outbox.handled",  # the relay's key in an event's metadata
}
#: mistakes the docs show on purpose (what an error message says about them)
_SHOWN_AS_MISTAKES = {"OUTBOX_DATABSE_URL", "event_broker.redis.colour", "event_broker.redis.prot"}
#: ``OUTBOX_*`` names that are not configuration variables
_NOT_VARIABLES = {"OUTBOX_CONFIG", "OUTBOX_EVENTS"}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _code(path: Path) -> Iterator[tuple[str, str]]:
    """``(language, text)`` of every fenced block and (``""``, text) of every inline code."""
    text = _text(path)
    for match in _CODE_BLOCK.finditer(text):
        yield match[1], match[2]
    for match in _INLINE.finditer(_CODE_BLOCK.sub("", text)):
        yield "", match[1]


@functools.cache
def _tracked() -> tuple[frozenset[str], frozenset[str]]:
    """Every file of the repository (git's list when this is a checkout) and every folder."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = frozenset(listed) if listed else frozenset(
        _rel(p) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts)
    folders = frozenset("/".join(f.split("/")[:i]) + "/"
                        for f in files for i in range(1, f.count("/") + 1))
    return files, folders


def _exists(name: str) -> bool:
    """A file or folder of the repository named by its path or by a path's tail
    (``relay/stats.py``, ``_sql/relay.py``, ``cli.py``, ``tests/migration/``)."""
    files, folders = _tracked()
    name = name.split("::")[0].removeprefix("./")
    pool = folders if name.endswith("/") else files
    return name in pool or any(p.endswith("/" + name) for p in pool)


def test_files_and_folders_named_exist() -> None:
    gone = []
    for path in DOCS:
        for language, code in _code(path):
            name = code.strip()
            if language or "://" in name or name.startswith("/") or not _PATH.fullmatch(name):
                continue
            if not _exists(name):
                gone.append(f"{_rel(path)}: {name}")
    assert not gone, "named in the docs, not in the repository:\n" + "\n".join(gone)


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    obj: object = outbox
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
            continue
        except AttributeError:
            pass
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def test_outbox_attributes_named_exist() -> None:
    gone = []
    for path in DOCS:
        for language, code in _code(path):
            if language not in ("", "python", "py"):
                continue
            for name in set(_ATTRIBUTE.findall(code)) - _NOT_ATTRIBUTES:
                if not _resolve(name) and not name.endswith((".yaml", ".yml", ".py", ".md")):
                    gone.append(f"{_rel(path)}: {name}")
    assert not gone, "named in the docs, not in the package:\n" + "\n".join(sorted(set(gone)))


def test_environment_variables_named_are_settings() -> None:
    known = set(_variables()) | _NOT_VARIABLES | _SHOWN_AS_MISTAKES
    gone = sorted({f"{_rel(path)}: {name}" for path in DOCS
                   for name in _VARIABLE.findall(_text(path))
                   if name not in known and not name.startswith(("OUTBOX_TEST_", "OUTBOX_CI_"))})
    assert not gone, "variables in the docs that no setting reads:\n" + "\n".join(gone)


def _dummy_env(text: str) -> dict[str, str]:
    return {name: "1" for name in re.findall(r"\$\{([A-Za-z_]\w*)", text)}


def test_configuration_files_in_the_docs_load() -> None:
    """Every YAML block with the ``event_broker:`` root is a valid configuration."""
    bad = []
    for path in DOCS:
        for language, code in _code(path):
            if language not in ("yaml", "yml") or "event_broker:" not in code:
                continue
            try:
                Config.from_dict(yaml.safe_load(code), env=_dummy_env(code))
            except Exception as exc:
                bad.append(f"{_rel(path)}: {exc}")
    assert not bad, "configuration examples that do not load:\n" + "\n".join(bad)


def test_configuration_keys_named_exist() -> None:
    """``event_broker.section.key`` names in the docs are keys of :class:`Config`."""
    keys = {"event_broker." + dotted for dotted in _variables().values()}
    keys |= {k.rsplit(".", 1)[0] for k in keys} | {"event_broker"} | _SHOWN_AS_MISTAKES
    gone = sorted({f"{_rel(path)}: {name}" for path in DOCS
                   for name in re.findall(r"\bevent_broker(?:\.\w+)+", _text(path))
                   if name not in keys})
    assert not gone, "configuration keys in the docs that do not exist:\n" + "\n".join(gone)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from outbox import cli
    from outbox.consume import cli as consume_cli
    from outbox.providers.database import __main__ as groups_cli
    from outbox.relay import cli as relay_cli

    return {"outbox": cli.build_parser(), "outbox.relay": relay_cli.build_parser(),
            "outbox.consume": consume_cli.build_parser(),
            "outbox.providers.database": groups_cli._parser()}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _check_command(program: str, words: list[str]) -> list[str]:
    """What is wrong with ``python -m program words...`` (unknown command or flag)."""
    parsers = _parsers()
    if program not in parsers:
        return [f"no command python -m {program}"]
    parser = parsers[program]
    chain = [parser]
    problems = []
    for word in words:
        if word in ("…", "...") or word.startswith(("<", "$", "[")):
            break
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            if flag != "--help" and not any(flag in p._option_string_actions for p in chain):
                problems.append(f"python -m {program}: no flag {flag}")
            continue
        sub = _subparsers(chain[-1])
        if sub and not word.startswith("-"):
            if word in sub:
                chain.append(sub[word])
            elif word.isidentifier() or re.fullmatch(r"[a-z][a-z-]*", word):
                problems.append(f"python -m {program}: no command {word!r}")
            continue
    return problems


def _commands(path: Path) -> Iterator[tuple[str, list[str]]]:
    for language, code in _code(path):
        if language not in ("", "sh", "bash", "shell", "console", "text"):
            continue
        for match in _COMMAND.finditer(code.replace("\\\n", " ")):
            try:
                words = shlex.split(match[2], comments=True)
            except ValueError:
                words = match[2].split()
            yield match[1].rstrip("."), words


def test_cli_commands_and_flags_named_exist() -> None:
    gone = []
    for path in DOCS:
        for program, words in _commands(path):
            gone += [f"{_rel(path)}: {problem}" for problem in _check_command(program, words)]
    assert not gone, "commands in the docs that do not exist:\n" + "\n".join(sorted(set(gone)))


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", _CODE_BLOCK.sub("", _text(path)), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_links_and_anchors_resolve() -> None:
    gone = []
    for path in DOCS:
        for target in _LINK.findall(_CODE_BLOCK.sub("", _text(path))):
            if re.match(r"[a-z]+:", target):
                continue  # https://, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                gone.append(f"{_rel(path)}: link to {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                gone.append(f"{_rel(path)}: no heading #{anchor} in {_rel(dest)}")
    assert not gone, "dead links in the docs:\n" + "\n".join(gone)


def test_new_applications_start_at_the_newest_revision() -> None:
    """The setup the docs give a new application applies ``outbox.migrations.HEAD``; every
    outbox revision the docs name exists."""
    revisions = {script.revision for script in outbox.migrations._revisions()}
    assert outbox.migrations.HEAD in revisions
    for name in ("docs/alembic.md", "docs/fastapi.md", "docs/flask.md"):
        first = re.search(r'outbox\.migrations\.upgrade\("([^"]+)"\)', _text(ROOT / name))
        assert first is not None and first[1] == outbox.migrations.HEAD, (
            f"{name}: a new application's first outbox revision is "
            f"{first and first[1]!r}, not outbox.migrations.HEAD ({outbox.migrations.HEAD!r})")
    named = {(path, rev) for path in DOCS for rev in re.findall(r"\boutbox_\d{4}\b", _text(path))}
    gone = sorted(f"{_rel(path)}: {rev}" for path, rev in named if rev not in revisions)
    assert not gone, "revisions named in the docs that do not exist:\n" + "\n".join(gone)


@pytest.mark.parametrize(("program", "words", "problem"), [
    ("outbox", ["events", "lists"], "no command 'lists'"),
    ("outbox.relay", ["--batchsize", "5"], "no flag --batchsize"),
    ("outbox", ["cleanup", "--older", "3d"], "no flag --older"),
    ("outbox.consumer", [], "no command python -m outbox.consumer"),
])
def test_the_command_check_catches_what_is_gone(program: str, words: list[str],
                                                problem: str) -> None:
    assert any(problem in p for p in _check_command(program, words))


def test_the_other_checks_catch_what_is_gone() -> None:
    assert not _exists("outbox/relay/nothing.py") and _exists("relay/relay.py")
    assert not _resolve("outbox.relay.Nothing") and _resolve("outbox.relay.Relay")


_SOURCE_REF = re.compile(r"\b(?:docs/[\w-]+\.md|(?:outbox|bench|tests|examples)/[\w/.-]*[\w/])")


def test_files_named_in_the_package_source_exist() -> None:
    """Docstrings and comments of ``outbox/`` that name a doc page or a file of the repository
    (``docs/relay.md``, ``outbox/_sql/relay.py``, ``bench/relay.py``) name one that exists."""
    gone = sorted({f"{_rel(source)}: {name}"
                   for source in (ROOT / "outbox").rglob("*.py")
                   for name in _SOURCE_REF.findall(_text(source))
                   if not (ROOT / name.rstrip(".")).exists()})
    assert not gone, "files named in the package's source that do not exist:\n" + "\n".join(gone)
