"""``python -m outbox.relay``: the relay sidecar (docs/relay.md).

::

    python -m outbox.relay [--database-url URL] [--config PATH]
        [--provider memory|redis|nats|database] [--app MODULE ...] [--batch-size N]
        [--poll-interval S] [--lease S]
        [--metrics-port PORT] [--metrics-host HOST] [--once] [--log-level LEVEL]
        [--pgbouncer [--listen-url URL]]

Every flag is also a config key (``event_broker.database.url``, ``provider``, ``apps``,
``database.batch_size``/``poll_interval``/``lease``/``notify``/``pgbouncer``/``listen_url``,
``metrics.port``/``host``, ``log_level``) and an ``OUTBOX_*`` variable
(``OUTBOX_DATABASE_URL``, ``OUTBOX_PROVIDER``, ``OUTBOX_APPS``, ``OUTBOX_DATABASE_BATCH_SIZE``,
``OUTBOX_DATABASE_PGBOUNCER``, …); flags win over the environment, which wins over the file.
With nothing set the relay runs on the embedded default: SQLite ``outbox.db`` in the working
directory (schema created if missing) and the memory provider.

Startup errors (bad flags or config, unreachable database, missing ``events`` table, an ``--app``
that does not import) print one line on stderr and exit 2. SIGTERM/SIGINT: finish the batch in
hand, hand back the rest, exit 0; a second signal stops the batch in hand too.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from outbox._cli import Failure, add_metrics_arguments, import_apps, leaves, print_error
from outbox._cli import load_config as _load_config
from outbox._logs import add_logging_arguments, configure_logging, preserved_logging
from outbox._redact import url_text
from outbox.exceptions import OutboxError
from outbox.providers._registry import describe as describe_provider

__all__ = ["build_parser", "main"]

log = logging.getLogger("outbox.relay")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m outbox.relay",
        description="Deliver committed events from the events table to handlers and a provider.",
    )
    p.add_argument("--database-url", metavar="URL",
                   help="database with the events table (default: config, "
                        "$OUTBOX_DATABASE_URL, else sqlite:///outbox.db)")
    p.add_argument("--config", metavar="PATH", help="outbox YAML config (default: $OUTBOX_CONFIG)")
    p.add_argument("--provider", metavar="NAME",
                   help="where events are forwarded: memory (default), redis, nats, database")
    p.add_argument("--app", action="append", default=[], metavar="MODULE",
                   help="module to import so its @outbox.subscribe handlers register "
                        "(repeatable)")
    p.add_argument("--batch-size", type=int, metavar="N", help="events per claim (default 100)")
    p.add_argument("--poll-interval", type=float, metavar="SECONDS",
                   help="look for events at least this often (default 1)")
    p.add_argument("--lease", type=float, metavar="SECONDS",
                   help="how long claimed events stay ours without renewal (default 30)")
    p.add_argument("--no-notify", action="store_true",
                   help="do not LISTEN for NOTIFY wake-ups (PostgreSQL); poll only")
    p.add_argument("--pgbouncer", action="store_true",
                   help="the database URL is PgBouncer in transaction pooling: no prepared "
                        "statements, no session settings, no LISTEN through it")
    p.add_argument("--listen-url", metavar="URL",
                   help="with --pgbouncer: a direct connection to LISTEN on (default: poll)")
    add_metrics_arguments(p)
    p.add_argument("--once", action="store_true",
                   help="process every event that is due, then exit 0")
    add_logging_arguments(p, default_level=None)
    return p


def load_config(args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    """Defaults < config file < ``OUTBOX_*`` environment < flags."""
    overrides: dict[str, Any] = {
        "database.url": args.database_url,
        "provider": args.provider,
        "database.batch_size": args.batch_size,
        "database.poll_interval": args.poll_interval,
        "database.lease": args.lease,
        "metrics.port": args.metrics_port,
        "metrics.host": args.metrics_host,
        "log_level": args.log_level,
    }
    if args.no_notify:
        overrides["database.notify"] = False
    if args.pgbouncer:
        overrides["database.pgbouncer"] = True
    if args.listen_url:
        overrides["database.listen_url"] = args.listen_url
    return _load_config(args.config, env, overrides)


def build_relay(config: Any) -> Any:
    """The default broker (provider from the config, handlers of the imported apps) + Relay."""
    import outbox
    from outbox.relay.relay import DEFAULT_DATABASE_URL, Relay

    try:
        broker = outbox.initialize(config)
    except OutboxError as exc:
        raise Failure(f"{config.provider} provider: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise Failure(f"{config.provider} provider: {exc}") from None
    db = config.database
    try:
        return Relay(
            db.url or DEFAULT_DATABASE_URL,
            broker=broker,
            batch_size=db.batch_size,
            poll_interval=db.poll_interval,
            lease=db.lease,
            notify=db.notify,
            retry_policy=config.retry_policy,
            pgbouncer=db.pgbouncer,
            listen_url=db.listen_url,
        )
    except OutboxError as exc:
        raise Failure(str(exc)) from None
    except Exception as exc:  # a bad URL or a missing driver, at engine creation
        raise Failure(f"database: {type(exc).__name__}: {exc}") from None


async def _signals(relay: Any, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if relay.stopping:
                log.warning("second %s: handing back the batch in hand now", name)
                relay.stop(now=True)
            else:
                log.info("%s: finishing the batch in hand, then exiting", name)
                relay.stop()


async def _run(relay: Any, config: Any, once: bool, apps: Sequence[str] = ()) -> None:
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(_signals, relay)  # before anything slow: SIGTERM always means stop
            try:
                await relay.start()
            except OutboxError as exc:
                raise Failure(str(exc)) from None
            if apps and not relay.broker.subscriptions():
                log.warning("--app %s subscribed no handlers (@outbox.subscribe): events are "
                            "forwarded and completed without any", ", ".join(apps))
            log.info("relay %s on %s%s, provider %s, batch %d, lease %.0fs, %s", relay.owner,
                     url_text(relay.url), " (PgBouncer mode)" if relay.pgbouncer else "",
                     describe_provider(config),
                     relay.batch_size, relay.lease,
                     "once: drain and exit" if once else "LISTEN/NOTIFY" if relay.notify
                     else f"polling {relay.poll_interval}s")
            if config.metrics.port is not None and not once:
                from outbox.health import observe_relay

                async with observe_relay(relay, host=config.metrics.host,
                                         port=config.metrics.port) as observed:
                    log.info("metrics on http://%s:%d/metrics", config.metrics.host,
                             observed.server.port)
                    await relay.run(once=once)
            elif not relay.stopping:
                await relay.run(once=once)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            provider = getattr(relay, "provider", None)
            if provider is not None:
                try:
                    await provider.close()
                except Exception as exc:  # closing must not hide how the run ended
                    log.warning("closing the provider failed: %s", exc)
    s = relay.stats
    # Hand-backs are counted per hand-back, not per event: an event held through an outage
    # goes back to pending at each attempt, so "8" may be one event handed back 8 times.
    log.info("relay stopped: %d completed, %d retried, %d failed, %d hand-back(s) of unstarted "
             "events", s.completed, s.retried, s.failed, s.released)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    try:
        with preserved_logging():  # a main() called as a function leaves logging as it was
            _main(args, env)
    except Failure as exc:
        print_error(exc, "outbox.relay")
        return 2
    except KeyboardInterrupt:  # a signal before the loop installed its handlers
        return 0
    return 0


def _main(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    config = load_config(args, env)
    configure_logging(config.log_level, args.log_format)
    apps = [*config.apps, *args.app]
    import_apps(apps)
    relay = build_relay(config)
    try:
        anyio.run(_run, relay, config, args.once, apps)
    except BaseExceptionGroup as group:  # from a task group: report the cause, briefly
        failures = [e for e in leaves(group) if isinstance(e, Failure | OutboxError)]
        if failures:
            raise Failure(str(failures[0])) from None
        raise
