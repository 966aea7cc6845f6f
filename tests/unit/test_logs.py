"""Logging: event fields on records, JSON lines, password masking, sidecar options."""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Iterator

import pytest

import outbox
from outbox._logs import (
    JsonFormatter,
    TextFormatter,
    add_logging_arguments,
    configure_logging,
    event_context,
    event_extra,
    preserved_logging,
    redact,
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    out = io.StringIO()
    yield out
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_event_fields(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream)
    ev = outbox.new_event("database", "public.users.create")
    ev.seq = 42
    log = logging.getLogger("outbox.test")
    log.info("forwarded %d", 1, extra=event_extra(ev))
    with event_context(ev):
        logging.getLogger("app.handlers").warning("handler says hi", extra={"attempt": 2})
    log.info("no event here")
    first, second, third = lines(stream)
    assert first["message"] == "forwarded 1" and first["level"] == "INFO"
    assert first["logger"] == "outbox.test"
    assert (first["event_id"], first["event_type"], first["event_seq"]) == (
        str(ev.id), "public.users.create", 42)
    assert second["event_id"] == str(ev.id) and second["attempt"] == 2
    assert "event_id" not in third
    assert str(first["ts"]).endswith("Z")


def test_exceptions_and_non_json_extras(stream: io.StringIO) -> None:
    configure_logging("INFO", "json", stream)
    try:
        raise ValueError("bad value")
    except ValueError:
        logging.getLogger("outbox.x").exception("failed", extra={"obj": object()})
    (doc,) = lines(stream)
    assert "ValueError: bad value" in str(doc["exc"])
    assert str(doc["obj"]).startswith("<object object")


def test_text_format_appends_event_fields(stream: io.StringIO) -> None:
    configure_logging("INFO", "text", stream)
    ev = outbox.new_event("system", "a.b")
    with event_context(ev):
        logging.getLogger("outbox.y").info("claimed")
    text = stream.getvalue()
    assert "INFO outbox.y: claimed [event_id=" in text and "event_type=a.b" in text


def test_passwords_in_urls_are_masked(stream: io.StringIO) -> None:
    assert redact("postgresql+psycopg://app:s3cret@db:5432/x") == \
        "postgresql+psycopg://app:***@db:5432/x"
    assert redact("redis://:pw@h/0 and nats://h:4222") == "redis://:***@h/0 and nats://h:4222"
    # a lone user-info part is a token; a password may hold "@"; server lists; plain text stays
    assert redact("nats://s3cr3t@h:4222") == "nats://***@h:4222"
    assert redact("redis://:p@ss@h/0") == "redis://:***@h/0"
    assert redact("nats://a:b@h1,nats://tok@h2 down") == "nats://a:***@h1,nats://***@h2 down"
    assert redact("mail ada@example.com about http://h/x?a=b@c") == \
        "mail ada@example.com about http://h/x?a=b@c"
    # the user name of a SQL database URL is not a secret (libpq has no tokens there)
    assert redact("postgresql+psycopg://app@db/x and mysql://root@h/t") == \
        "postgresql+psycopg://app@db/x and mysql://root@h/t"
    configure_logging("INFO", "json", stream)
    logging.getLogger("outbox.z").warning("cannot reach %s", "redis://u:topsecret@h")
    logging.getLogger("outbox.z").warning("cannot reach %s", "nats://t0psecret@h")
    assert "topsecret" not in stream.getvalue() and "t0psecret" not in stream.getvalue()
    text = TextFormatter().format(logging.LogRecord("n", logging.INFO, "", 0,
                                                    "url mysql://a:b@c", (), None))
    assert "a:***@c" in text
    assert "***" in JsonFormatter().format(logging.LogRecord("n", logging.INFO, "", 0,
                                                             "x://u:p@h", (), None))


def test_secret_query_parameters_are_masked() -> None:
    """``?password=`` (libpq and SQLAlchemy accept it) and other secret-looking parameters: the
    value is hidden wherever the URL appears; other parameters and the sentence around stay."""
    assert redact("cannot connect to postgresql+psycopg://app@127.0.0.1/x?password=SecretQ-991: "
                  "refused") == "cannot connect to postgresql+psycopg://app@127.0.0.1/x?" \
                                "password=***: refused"
    assert redact("postgresql://h/x?sslmode=require&sslpassword=k3y&application_name=a") == \
        "postgresql://h/x?sslmode=require&sslpassword=***&application_name=a"
    assert redact("redis://h/0?token=t0k&db=1, nats://h?auth_token=abc") == \
        "redis://h/0?token=***&db=1, nats://h?auth_token=***"
    assert redact("http://h/x?q=password") == "http://h/x?q=password"
    assert redact("no url here: password=abc") == "no url here: password=abc"


def test_configure_is_idempotent_and_validates(stream: io.StringIO) -> None:
    root = logging.getLogger()
    configure_logging("INFO", "text", stream)
    configure_logging("WARNING", "json", stream)
    marked = [h for h in root.handlers if getattr(h, "_outbox_sidecar_handler", False)]
    assert len(marked) == 1 and root.level == logging.WARNING
    with pytest.raises(ValueError, match="log level"):
        configure_logging("LOUD")
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml")


def test_sidecar_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser)
    args = parser.parse_args(["--log-level", "debug", "--log-format", "json"])
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    assert parser.parse_args([]).log_format == "text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "yaml"])


def test_preserved_logging_puts_the_root_logger_back() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    with preserved_logging():
        configure_logging("DEBUG", "json", io.StringIO())
        configure_logging("ERROR", "text", io.StringIO())  # replaces its own handler
        assert root.level == logging.ERROR
    assert (list(root.handlers), root.level) == before


def test_clis_called_as_functions_leave_logging_alone(tmp_path: pytest.TempPathFactory,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``main(argv)`` of each CLI configures logging for its run only (the unit-test guard in
    conftest.py fails the test if the root logger changed)."""
    from outbox.broker import default
    from outbox.cli import main as cli_main
    from outbox.consume.cli import main as consume_main
    from outbox.relay.cli import main as relay_main

    nowhere = "postgresql+psycopg://outbox@127.0.0.1:1/nowhere"
    # The sidecars build the default broker (their process's); start from an empty registry so
    # a handler some earlier test registered cannot turn the consumer into a running one.
    saved = default._snapshot()
    default._restore((None, {}))
    try:
        assert cli_main(["stats", "--database-url", nowhere, "--log-level", "DEBUG"]) == 1
        assert relay_main(["--database-url", nowhere, "--once", "--log-level", "DEBUG"],
                          env={}) == 2
        assert consume_main(["--provider", "redis", "--group", "g", "--log-level", "DEBUG"],
                            env={}) == 2
    finally:
        default._restore(saved)
    err = capsys.readouterr().err
    assert "cannot connect" in err and "no handlers are subscribed" in err
