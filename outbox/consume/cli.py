"""``python -m outbox.consume``: run subscribed handlers for events from the bus.

::

    python -m outbox.consume --provider redis --group billing --app myapp.handlers \\
        [--pattern 'public.orders.*'] [--from beginning] [--inbox-database-url URL]

Connection settings come from the config file (``--config`` or ``OUTBOX_CONFIG``, sections
``redis:``/``nats:``/``database:``) and the ``OUTBOX_*`` environment variables
(``OUTBOX_REDIS_URL``, ``OUTBOX_NATS_URL``, ``OUTBOX_DATABASE_URL`` …). ``--group`` defaults to
the config's ``redis.consumer_group`` / ``nats.durable``. The modules given with ``--app`` are
imported so their ``@outbox.subscribe`` handlers register; starting with no handler at all is
refused (it would acknowledge every event unhandled).

SIGTERM / SIGINT: stop pulling, let the handlers in flight finish (``--shutdown-timeout``),
settle them, exit 0. Startup errors (bad flags or config, an ``--app`` that does not import,
a missing ``outbox_inbox`` table) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from outbox._cli import (
    Failure,
    add_metrics_arguments,
    import_apps,
    leaves,
    load_config,
    print_error,
)
from outbox._logs import add_logging_arguments, configure_logging, preserved_logging
from outbox.exceptions import OutboxError
from outbox.providers import _registry
from outbox.providers.base import StartPosition, parse_start

if TYPE_CHECKING:
    from outbox.config import MetricsConfig

__all__ = ["build_parser", "main"]

log = logging.getLogger("outbox.consume")

#: The providers that carry events to other processes (the registry's ``cross_process``).
PROVIDERS = tuple(name for name, e in _registry.PROVIDERS.items() if e.cross_process)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.consume",
        description="Run the handlers of --app modules for events arriving from Redis Streams, "
                    "NATS JetStream or the database bus, as a member of a consumer group.",
    )
    parser.add_argument("--provider", choices=PROVIDERS,
                        help="the bus (default: the config's provider)")
    parser.add_argument("--group", help="consumer group: the Redis group / JetStream durable "
                        "(default: redis.consumer_group or nats.durable from the config)")
    parser.add_argument("--app", action="append", default=[], metavar="MODULE",
                        help="module to import so its handlers register (repeatable)")
    parser.add_argument("--pattern", action="append", metavar="P",
                        help="event types this group takes (repeatable; default every type)")
    parser.add_argument("--from", dest="start", default="now", metavar="WHERE",
                        help="where a new group starts: now (default), beginning, or an ISO "
                             "8601 time (UTC when it has no offset)")
    parser.add_argument("--consumer", metavar="NAME",
                        help="this member's name in the group (default: the instance id)")
    parser.add_argument("--config", metavar="PATH",
                        help="outbox YAML config (default: $OUTBOX_CONFIG)")
    parser.add_argument("--database-url", metavar="URL",
                        help="database of --provider database (default: config / "
                             "$OUTBOX_DATABASE_URL)")
    parser.add_argument("--inbox-database-url", metavar="URL",
                        help="record handled event ids in outbox_inbox of this database, in "
                             "the handlers' transaction (see outbox.inbox)")
    parser.add_argument("--pgbouncer", action="store_true",
                        help="the database URLs are PgBouncer in transaction pooling: no "
                             "prepared statements, no LISTEN through it (database.pgbouncer)")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="deliveries handled at once (default: worker_count, 10)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long handlers in flight may finish (default 30)")
    add_metrics_arguments(parser)
    add_logging_arguments(parser, default_level=None)
    return parser


def _start(text: str) -> StartPosition | dt.datetime:
    try:
        return parse_start(text)
    except ValueError:
        raise Failure(f"--from {text!r}: use now, beginning or an ISO 8601 time such as "
                      "2026-01-01T00:00Z") from None


# --------------------------------------------------------------------------------------------
# configuration


def build_provider(config: Any) -> Any:
    from outbox.config import provider_from_config

    if config.provider not in PROVIDERS:
        raise Failure(f"provider {config.provider!r} cannot deliver to other processes: pass "
                      f"--provider {{{','.join(PROVIDERS)}}}")
    if config.provider == "database" and not config.database.url:
        raise Failure("--provider database needs --database-url, $OUTBOX_DATABASE_URL or "
                      "database.url in the config")
    try:
        return provider_from_config(config)
    except (ValueError, TypeError) as exc:
        raise Failure(f"{config.provider} provider: {exc}") from None


# --------------------------------------------------------------------------------------------
# running


async def _serve(consumer: Any, metrics: MetricsConfig) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_signals, consumer, tg.cancel_scope)
        if metrics.port is not None:
            tg.start_soon(_health, consumer, metrics.host, metrics.port)
        await consumer.run()
        tg.cancel_scope.cancel()


async def _signals(consumer: Any, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if consumer._stopping:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                scope.cancel()
                return
            log.info("%s: finishing the deliveries in hand", signal.Signals(signum).name)
            consumer.stop()


async def _health(consumer: Any, host: str, port: int) -> None:
    from outbox.health import (
        HealthMonitor,
        HealthServer,
        HealthState,
        database_check,
        provider_check,
    )

    checks = {"provider": provider_check(consumer.provider)}
    if consumer.inbox is not None:
        checks["database"] = database_check(consumer.inbox.engine)
    state = HealthState(expected=tuple(checks))
    server = HealthServer(state, host=host, port=port).start()
    log.info("metrics on %s/metrics", server.url)  # like the relay's (port 0: the one picked)
    try:
        await HealthMonitor(state, checks).run()
    finally:
        server.close()


def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from outbox.broker import get_default_broker
    from outbox.consume.consumer import Consumer
    from outbox.events import set_instance_id
    from outbox.inbox import Inbox

    start = _start(args.start)
    if args.concurrency is not None and args.concurrency < 1:
        raise Failure("--concurrency must be >= 1")
    config = load_config(args.config, env, {"provider": args.provider,
                                            "database.url": args.database_url,
                                            "log_level": args.log_level,
                                            "database.pgbouncer": args.pgbouncer or None,
                                            "metrics.port": args.metrics_port,
                                            "metrics.host": args.metrics_host})
    configure_logging(config.log_level, args.log_format)
    if config.instance_id:
        set_instance_id(config.instance_id)
    if config.provider not in PROVIDERS:
        raise Failure(f"no bus to consume from: pass --provider {{{','.join(PROVIDERS)}}} (the "
                      f"config says {config.provider!r})")
    import_apps([*config.apps, *args.app])
    broker = get_default_broker()
    if not broker.subscriptions():
        raise Failure("no handlers are subscribed: pass --app MODULE with @outbox.subscribe "
                      "handlers (consuming without any would acknowledge every event unhandled)")
    provider = build_provider(config)
    log.info("provider %s", _registry.describe(config))
    group = args.group or getattr(provider, "consumer_group", None)
    if not group:
        raise Failure("--group is required")
    retry_policy = config.retry_policy
    concurrency = args.concurrency or config.worker_count
    inbox = (Inbox(args.inbox_database_url, pgbouncer=config.database.pgbouncer)
             if args.inbox_database_url else None)
    metrics = None
    if config.metrics.port is not None:
        from outbox.metrics import get_metrics

        metrics = get_metrics()
        metrics.attach_broker(broker)  # handler durations
    try:
        consumer = Consumer(
            provider, group=group, patterns=args.pattern or ("*",), broker=broker,
            consumer=args.consumer, start=start, retry_policy=retry_policy,
            concurrency=concurrency, inbox=inbox, shutdown_timeout=args.shutdown_timeout,
            metrics=metrics,
        )
    except (TypeError, ValueError) as exc:
        raise Failure(str(exc)) from None

    async def main() -> None:
        try:
            await _serve(consumer, config.metrics)
        finally:
            with anyio.CancelScope(shield=True):
                await provider.close()
                if inbox is not None:
                    await inbox.close()

    try:
        anyio.run(main)
    except BaseExceptionGroup as group_error:  # from the task group: report the cause, briefly
        causes = leaves(group_error)
        if causes and all(isinstance(e, OutboxError | ValueError) for e in causes):
            raise causes[0] from None
        raise
    return 0


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with preserved_logging():
            return run(args, os.environ if env is None else env)
    except Failure as exc:
        print_error(exc, "outbox.consume")
        return 2
    except OutboxError as exc:  # e.g. SchemaMissing from the inbox check, a refused durable
        print_error(exc, "outbox.consume")
        return 2 if type(exc).__name__ == "SchemaMissing" else 1
    except ValueError as exc:
        print_error(exc, "outbox.consume")
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signals are handled inside the loop
        return 130
