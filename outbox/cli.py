"""``python -m outbox``: look at, replay and trim the ``events`` table.

Commands (``--help`` on each)::

    python -m outbox events list [filters] [--limit N] [--offset N] [--json]
    python -m outbox events show ID
    python -m outbox replay ID... | --status failed [filters] [--dry-run]
    python -m outbox stats [--since 24h] [--json]
    python -m outbox failures [--limit 50] [--json]
    python -m outbox cleanup --older-than 30d [--status completed,failed] [--batch 5000] [--dry-run]
    python -m outbox console [--host 127.0.0.1] [--port 8765] [--read-only] [--no-auth]

The database comes from ``--database-url``, else the ``--config`` file (or ``OUTBOX_CONFIG``),
else ``OUTBOX_DATABASE_URL``, else the embedded default ``outbox.db`` in the working directory
when it exists. Exit codes: 0 done, 1 failed (database unreachable, schema missing, event not
found, some ids not replayable), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from outbox import _json, ops
from outbox._cli import (
    ConfigFailure,
    Failure,
    load_config,
    print_error,
    warn_unknown_variables,
)
from outbox._duration import parse_duration, parse_time
from outbox._engines import create_engine
from outbox._logs import LOG_LEVELS, configure_logging, preserved_logging, redact
from outbox._meta import DISTRIBUTION
from outbox._redact import url_text
from outbox._sql import console as console_sql
from outbox.console import cli as console_cli
from outbox.events import Event, EventFilter, EventSource, EventStatus, Operation, utcnow
from outbox.exceptions import OutboxError
from outbox.schema import check_schema

__all__ = ["build_parser", "main", "parse_duration", "parse_time"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EMBEDDED_DB = "outbox.db"


class UsageError(Exception):
    """Bad command-line input (exit 2)."""


# --------------------------------------------------------------------------------------------
# value parsing


def _arg(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type=`` whose ValueError message reaches the user (exit 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def _event_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError(f"invalid event id {text!r}: expected a UUID") from None


def _pattern(text: str) -> str:
    EventFilter(type=text)  # ValueError naming what is wrong with the pattern
    return text


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least 1, got {value}" if minimum else
                         f"must not be negative, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _pause(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid number of seconds {text!r}") from None
    if not value >= 0:
        raise ValueError(f"must not be negative, got {text}")
    return value


def _statuses(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in ops.FINISHED]
    if not names or bad:
        raise ValueError(
            f"cleanup deletes finished events only: --status takes {','.join(ops.FINISHED)} "
            f"(comma-separated), not {text!r}"
        )
    return names


# --------------------------------------------------------------------------------------------
# parser


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Connection and logging options; accepted before and after the command name."""
    default: Any = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--database-url", default=default, metavar="URL",
        help="SQLAlchemy URL of the database (default: $OUTBOX_DATABASE_URL, the --config file, "
        "or ./outbox.db)",
    )
    group.add_argument(
        "--config", default=default, metavar="PATH",
        help="outbox YAML config file (default: $OUTBOX_CONFIG); its database.url is used",
    )
    group.add_argument(
        "--pgbouncer", action="store_true", default=False if top else argparse.SUPPRESS,
        help="the URL is PgBouncer in transaction pooling: no prepared statements "
        "(also $OUTBOX_DATABASE_PGBOUNCER, the config's database.pgbouncer)",
    )
    group.add_argument(
        "--log-level", default="WARNING" if top else argparse.SUPPRESS, type=str.upper,
        choices=LOG_LEVELS, help="log level on stderr (default WARNING)",
    )


def _filters(parser: argparse.ArgumentParser, *, with_status: bool = True) -> None:
    group = parser.add_argument_group("filters (all must match)")
    group.add_argument("--source", choices=[s.value for s in EventSource])
    group.add_argument(
        "--type", type=_arg(_pattern, "pattern"), metavar="PATTERN",
        help="event type or pattern: public.users.*, public.>, *",
    )
    if with_status:
        group.add_argument("--status", choices=[s.value for s in EventStatus])
    group.add_argument("--user-id", metavar="ID")
    group.add_argument("--session-id", metavar="ID")
    group.add_argument("--instance-id", metavar="ID")
    group.add_argument("--schema-name", "--schema", dest="schema_name", metavar="NAME")
    group.add_argument("--entity", metavar="TABLE")
    group.add_argument("--entity-id", metavar="ID")
    group.add_argument("--operation", choices=[o.value for o in Operation])
    group.add_argument(
        "--since", type=_arg(parse_time, "time"), metavar="WHEN",
        help="created at or after: a duration ago (1h, 7d) or an ISO 8601 time",
    )
    group.add_argument(
        "--until", type=_arg(parse_time, "time"), metavar="WHEN",
        help="created before: a duration ago or an ISO 8601 time",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m outbox``."""
    parser = argparse.ArgumentParser(
        prog="python -m outbox",
        description="Inspect, replay and clean up the outbox events table.",
        epilog="Exit codes: 0 done, 1 failed, 2 bad usage.",
    )
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    events = commands.add_parser("events", help="list or show events",
                                 description="List or show events.")
    _common(events, top=False)
    events_cmds = events.add_subparsers(dest="events_command", metavar="COMMAND", required=True)

    lst = events_cmds.add_parser(
        "list", help="events matching filters",
        description="Events matching the filters, oldest first (created_at, seq).",
    )
    _common(lst, top=False)
    _filters(lst)
    lst.add_argument("--limit", type=_arg(_non_negative, "number"), default=100,
                     help="at most this many events (default 100; 0 for no limit)")
    lst.add_argument("--offset", type=_arg(_non_negative, "number"), default=0,
                     help="skip this many events first")
    lst.add_argument("--json", action="store_true", help="a JSON array of full events")
    lst.set_defaults(run=cmd_list)

    show = events_cmds.add_parser("show", help="one event as JSON",
                                  description="Print one event, every column, as JSON.")
    _common(show, top=False)
    show.add_argument("id", type=_arg(_event_id, "uuid"), metavar="ID", help="event id (UUID)")
    show.set_defaults(run=cmd_show)

    replay = commands.add_parser(
        "replay", help="failed events back to pending",
        description="Move failed events back to pending with retry_count 0, due now. Give event "
        "ids, or --status failed with optional filters.",
    )
    _common(replay, top=False)
    replay.add_argument("ids", nargs="*", type=_arg(_event_id, "uuid"), metavar="ID",
                        help="event ids (each must be failed)")
    replay.add_argument("--status", choices=[EventStatus.FAILED.value],
                        help="replay every failed event matching the filters")
    _filters(replay, with_status=False)
    replay.add_argument("--batch", type=_arg(_positive, "number"), default=1000,
                        help="events per transaction (default 1000)")
    replay.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    replay.add_argument("--json", action="store_true", help="report as JSON")
    replay.set_defaults(run=cmd_replay)

    stats = commands.add_parser(
        "stats", help="counts by status and type, backlog and lag",
        description="Counts of events by status and by type, the relay's backlog and the lag "
        "(age of the oldest undelivered event).",
    )
    _common(stats, top=False)
    stats.add_argument("--since", type=_arg(parse_time, "time"), metavar="WHEN",
                       help="count only events created since then (default: all)")
    stats.add_argument("--json", action="store_true", help="report as JSON")
    stats.set_defaults(run=cmd_stats)

    failures = commands.add_parser(
        "failures", help="failed events grouped by type and error; blocked ordering keys",
        description="Failed events grouped by type and error (largest groups first), and the "
        "ordering keys a failed event holds back, with the event that holds each. Replay with "
        "`replay --status failed --type TYPE` or `replay ID`.",
    )
    _common(failures, top=False)
    failures.add_argument("--limit", type=_arg(_positive, "number"), default=50,
                          help="at most this many groups and keys (default 50)")
    failures.add_argument("--json", action="store_true", help="report as JSON")
    failures.set_defaults(run=cmd_failures)

    cleanup = commands.add_parser(
        "cleanup", help="delete old finished events in small batches",
        description="Delete completed/failed events created before the cutoff, in batches of "
        "short transactions (writers and relays keep running). Pending and processing events "
        "are never deleted.",
    )
    _common(cleanup, top=False)
    cleanup.add_argument("--older-than", required=True, type=_arg(parse_duration, "duration"),
                         metavar="AGE", help="created more than this long ago: 30d, 12h, 2w")
    cleanup.add_argument("--status", type=_arg(_statuses, "statuses"),
                         default=ops.FINISHED, metavar="LIST",
                         help="comma-separated: completed,failed (default both)")
    cleanup.add_argument("--batch", type=_arg(_positive, "number"), default=5000,
                         help="rows per transaction (default 5000)")
    cleanup.add_argument("--pause", type=_arg(_pause, "seconds"), default=None,
                         metavar="SECONDS",
                         help="sleep between batches (default: as long as the last batch took, "
                         "so cleanup leaves half the database's time to others; 0: full speed)")
    cleanup.add_argument("--dry-run", action="store_true", help="only count what would go")
    cleanup.add_argument("--json", action="store_true", help="report as JSON")
    cleanup.set_defaults(run=cmd_cleanup)

    console_cli.add_parser(commands, _common)
    return parser


# --------------------------------------------------------------------------------------------
# database


def resolve_database_url(args: argparse.Namespace, env: dict[str, str] | None = None) -> str:
    """The URL to use, by precedence (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    if args.database_url:
        return str(args.database_url)
    config_path = args.config or env.get("OUTBOX_CONFIG")
    if config_path:
        url = _url_from_config(config_path, env)
        if url:
            return url
    if env.get("OUTBOX_DATABASE_URL"):
        return env["OUTBOX_DATABASE_URL"]
    if Path(EMBEDDED_DB).exists():
        return f"sqlite:///{EMBEDDED_DB}"
    raise Failure(
        "no database: pass --database-url, set OUTBOX_DATABASE_URL, or give --config "
        f"(and there is no {EMBEDDED_DB} in the working directory)"
    )


def _url_from_config(path: str, env: dict[str, str]) -> str | None:
    url = load_config(path, env).database.url
    return str(url) if url else None


def _engine(args: argparse.Namespace) -> Engine:
    url = resolve_database_url(args)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise UsageError(f"invalid database URL {redact(url)!r}") from None
    try:
        engine = create_engine(parsed, pgbouncer=_pgbouncer(args))
    except OutboxError as exc:  # a URL option refused, PgBouncer mode on another database
        raise UsageError(str(exc)) from None
    except ImportError as exc:
        raise Failure(
            f"no driver for {parsed.drivername}: {exc} (for PostgreSQL: pip install "
            f"'{DISTRIBUTION}[postgres]')"
        ) from None
    safe = url_text(parsed)
    try:
        check_schema(engine)
    except OutboxError as exc:
        engine.dispose()
        raise Failure(f"{safe}: {exc}") from None
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise Failure(f"cannot connect to {safe}: {_first_line(exc.orig or exc)}") from None
    return engine


def _pgbouncer(args: argparse.Namespace) -> bool:
    """``--pgbouncer``, else the config's ``database.pgbouncer`` (file or environment)."""
    if args.pgbouncer:
        return True
    return bool(load_config(args.config, os.environ).database.pgbouncer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# output


def _jsonable(value: Any) -> Any:
    return _json.to_jsonable(value)


def event_document(event: Event) -> dict[str, Any]:
    """Every column of ``event`` as JSON-safe values (datetimes ISO 8601, ids as text)."""
    doc: dict[str, Any] = _jsonable(event.to_dict())
    return doc


def _dump(value: Any, out: IO[str], *, pretty: bool = True) -> None:
    json.dump(_jsonable(value), out, indent=2 if pretty else None, ensure_ascii=False)
    out.write("\n")


def _ts(value: dt.datetime | None) -> str:
    return "" if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str | None, width: int) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: IO[str]) -> None:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _filter_from(args: argparse.Namespace, **extra: Any) -> EventFilter:
    return EventFilter(
        source=args.source,
        type=args.type,
        status=getattr(args, "status", None),
        user_id=args.user_id,
        session_id=args.session_id,
        instance_id=args.instance_id,
        schema_name=args.schema_name,
        entity=args.entity,
        entity_id=args.entity_id,
        operation=args.operation,
        start_time=args.since,
        end_time=args.until,
        **extra,
    )


# --------------------------------------------------------------------------------------------
# commands


def cmd_list(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    f = _filter_from(args, limit=args.limit or None, offset=args.offset)
    with engine.connect() as conn:
        found = ops.list_events(conn, f)
    if args.json:
        _dump([event_document(e) for e in found], out)
        return EXIT_OK
    rows = [
        (e.seq, _ts(e.created_at), e.status, e.type, e.entity_id, e.user_id, e.retry_count,
         e.id, _clip(e.error, 40))
        for e in found
    ]
    _table(("SEQ", "CREATED (UTC)", "STATUS", "TYPE", "ENTITY_ID", "USER", "RETRIES", "ID",
            "ERROR"), rows, out)
    more = " (limit reached: --limit/--offset for more)" if args.limit and \
        len(found) == args.limit else ""
    out.write(f"{len(found)} event(s){more}\n")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    with engine.connect() as conn:
        event = ops.get_event(conn, args.id)
    if event is None:
        raise Failure(f"event {args.id} not found")
    _dump(event_document(event), out)
    return EXIT_OK


_FILTER_DESTS = ("source", "type", "user_id", "session_id", "instance_id", "schema_name",
                 "entity", "entity_id", "operation", "since", "until")


def cmd_replay(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    used_filters = [d for d in _FILTER_DESTS if getattr(args, d) is not None]
    if args.ids and (args.status or used_filters):
        raise UsageError("replay takes event ids or --status failed with filters, not both")
    if not args.ids and not args.status:
        raise UsageError("replay needs event ids, or --status failed (with optional filters)")
    if args.ids:
        result = ops.replay(engine, ids=args.ids, dry_run=args.dry_run, batch_size=args.batch)
    else:
        result = ops.replay(engine, filter=_filter_from(args), dry_run=args.dry_run,
                            batch_size=args.batch)
    problems = bool(result.missing or result.skipped)
    if args.json:
        _dump({
            "replayed": result.replayed,
            "dry_run": result.dry_run,
            "missing": [str(i) for i in result.missing],
            "not_failed": {str(i): s for i, s in result.skipped.items()},
        }, out)
    else:
        verb = "would replay" if result.dry_run else "replayed"
        out.write(f"{verb} {result.replayed} event(s)\n")
        for event_id in result.missing:
            out.write(f"not found: {event_id}\n")
        for event_id, status in result.skipped.items():
            out.write(f"not failed (status {status}), left alone: {event_id}\n")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_stats(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    with engine.connect() as conn:
        result = ops.stats(conn, since=args.since)
    now = utcnow()
    b = result.backlog
    if args.json:
        _dump({
            "since": result.since,
            "total": result.total,
            "by_status": result.by_status,
            "by_type": result.by_type,
            "backlog": {"pending": b.pending, "processing": b.processing, "failed": b.failed,
                        "blocked_keys": b.blocked_keys},
            "oldest_undelivered_created_at": b.oldest_created_at,
            "lag_seconds": round(b.lag_seconds(now), 3),
        }, out)
        return EXIT_OK
    scope = f" created since {_ts(result.since)} UTC" if result.since else ""
    out.write(f"{result.total} event(s){scope}\n")
    statuses = [s.value for s in EventStatus]
    _table(("STATUS", "COUNT"), [(s, result.by_status.get(s, 0)) for s in statuses], out)
    out.write(
        f"\nbacklog (whole table): {b.pending} pending, {b.processing} processing, "
        f"{b.failed} failed, {b.blocked_keys} blocked ordering key(s)\n"
    )
    if b.oldest_created_at is None:
        out.write("lag: 0 s (nothing waiting)\n")
    else:
        out.write(f"lag: {b.lag_seconds(now):.1f} s (oldest undelivered event created "
                  f"{_ts(b.oldest_created_at)} UTC)\n")
    if result.by_type:
        out.write("\n")
        rows = [(t, *(counts.get(s, 0) for s in statuses), sum(counts.values()))
                for t, counts in result.by_type.items()]
        _table(("TYPE", *(s.upper() for s in statuses), "TOTAL"), rows, out)
    return EXIT_OK


def cmd_failures(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    with engine.connect() as conn:
        groups = console_sql.failure_groups(conn, args.limit)
        blocked = console_sql.blocked_key_details(conn, args.limit)
        failed = console_sql.failed_count(conn)
    if args.json:
        _dump({
            "failed": failed,
            "grouped": min(failed, console_sql.FAILURE_SCAN),
            "groups": [{"type": g.type, "error": g.error, "count": g.count,
                        "first_created_at": g.first_at, "last_created_at": g.last_at}
                       for g in groups],
            "blocked_keys": [{"key": b.key, "held_by": b.holder_id, "type": b.holder_type,
                              "error": b.holder_error, "failed": b.failed,
                              "waiting": b.waiting, "waiting_capped": b.waiting_capped}
                             for b in blocked],
        }, out)
        return EXIT_OK
    _table(("COUNT", "TYPE", "LAST (UTC)", "ERROR"),
           [(g.count, g.type, _ts(g.last_at), _clip(g.error, 70)) for g in groups], out)
    scope = f" (the newest {console_sql.FAILURE_SCAN})" if failed > console_sql.FAILURE_SCAN \
        else ""
    out.write(f"{failed} failed event(s); {len(groups)} group(s){scope}\n")
    if blocked:
        out.write("\n")
        _table(("KEY", "HELD BY", "WAITING", "ERROR"),
               [(b.key, b.holder_id, f"{b.waiting - 1}+" if b.waiting_capped else b.waiting,
                 _clip(b.holder_error, 50)) for b in blocked], out)
    out.write(f"{len(blocked)} blocked ordering key(s)\n")
    return EXIT_OK


def cmd_cleanup(args: argparse.Namespace, engine: Engine, out: IO[str]) -> int:
    def progress(r: ops.CleanupResult) -> None:
        log.info("cleanup: %d deleted in %d batch(es)", r.deleted, r.batches)

    result = ops.cleanup(
        engine, older_than=args.older_than, statuses=args.status, batch_size=args.batch,
        dry_run=args.dry_run, pause=args.pause, progress=progress,
    )
    if args.json:
        _dump({
            "deleted": result.deleted, "dry_run": result.dry_run, "by_status": result.by_status,
            "batches": result.batches, "seconds": round(result.seconds, 3),
            "rows_per_second": round(result.rate, 1),
        }, out)
        return EXIT_OK
    detail = ", ".join(f"{s}: {n}" for s, n in result.by_status.items())
    if result.dry_run:
        out.write(f"would delete {result.deleted} event(s) ({detail})\n")
    else:
        out.write(
            f"deleted {result.deleted} event(s) ({detail}) in {result.batches} batch(es), "
            f"{result.seconds:.1f} s ({result.rate:.0f} rows/s)\n"
        )
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> int:
    """Run the CLI; returns the exit code (``python -m outbox`` exits with it)."""
    out = out if out is not None else sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage, 0 for --help
    with preserved_logging():
        configure_logging(args.log_level)
        warn_unknown_variables(os.environ)
        return _main(parser, args, out)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, out: IO[str]) -> int:
    try:
        engine = _engine(args)
        try:
            code: int = args.run(args, engine, out)
        finally:
            engine.dispose()
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print_error(exc, parser.prog)
        return EXIT_USAGE
    except ConfigFailure as exc:
        print_error(exc)
        return EXIT_USAGE
    except Failure as exc:
        print_error(exc)
        return EXIT_FAILED
    except ValueError as exc:
        print_error(exc)
        return EXIT_USAGE
    except sa.exc.DBAPIError as exc:
        print_error(f"database: {_first_line(exc.orig or exc)}")
        return EXIT_FAILED
    return code
