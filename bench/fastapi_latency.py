"""Commit → handler → completed latency of the FastAPI walkthrough (docs/fastapi.md), not a test.

What users run: an example application (``examples/``) under uvicorn (one process), its schema
made by ``alembic upgrade head``, the relay sidecar as ``python -m outbox.relay --app
<example>.handlers`` runs it (NOTIFY on, default settings, memory provider), and HTTP requests
that each commit one new item, one at a time at a modest rate (default 300 at 20/s, after 20
warm-up requests). Variants, alternated, ``--rounds`` each:

- ``sqlmodel``: ``examples/fastapi_app`` — sync endpoint, its ``def`` handler (a ``Session`` on
  the sync engine, ``outbox.inbox.record``, one activity row);
- ``async``: ``examples/fastapi_async`` — async endpoint, its ``async def`` handler (the app's
  ``AsyncSession``, ``outbox.inbox.record_async``, one activity row);
- ``async-def``: the async app with a ``def`` handler doing the same on a sync engine made once
  at import (what an async app gets by copying the ``def`` handler of the SQLModel path);
- ``async-noop``: the async app with a ``def`` handler that writes nothing (the relay's part);
- ``engine-per-event`` (not in the default set): a ``def`` handler that makes its engine inside
  the handler, as a handler written without a module-level engine does.

Timestamps, one clock (every process runs on this host): *commit* — SQLAlchemy's
``after_commit`` of the web process's session that inserted the item; *claimed* — the relay's
``on_claim`` hook; *handlers start / end* — ``async def`` probes subscribed right before and
right after the handlers (a ``def`` handler's thread hop counts as handler time); *completed* —
the relay's ``on_settled`` hook, after the outcome's transaction committed.

Baseline in the same run, alternated with the variants: ``python bench/relay.py --only c``
(commit → a no-op ``async def`` handler, raw psycopg writer, NOTIFY on).

    python bench/fastapi_latency.py                          # 3 rounds of the default set
    python bench/fastapi_latency.py --rounds 5 --requests 300 --rate 20
    python bench/fastapi_latency.py --variants async,engine-per-event --no-baseline

PostgreSQL on 127.0.0.1:5432 (user postgres, trust); each example gets a scratch database.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT))

import _scratch  # noqa: E402


@dataclass(frozen=True)
class Example:
    package: str
    url_variable: str
    item_type: str


EXAMPLE = {
    "sqlmodel": Example("fastapi_app", "FASTAPI_APP_DATABASE_URL", "public.item.create"),
    "async": Example("fastapi_async", "FASTAPI_ASYNC_DATABASE_URL", "public.items.create"),
}
#: variant -> (example, handler: "app" = the example's own handlers module, else a bench one)
VARIANTS = {
    "sqlmodel": ("sqlmodel", "app"),
    "async": ("async", "app"),
    "async-def": ("async", "def"),
    "async-noop": ("async", "noop"),
    "engine-per-event": ("async", "engine-per-event"),
}
DEFAULT_VARIANTS = "sqlmodel,async,async-def,async-noop"
STAGES = ("claimed", "start", "end", "done")
STAGE_NAMES = {"claimed": "claimed", "start": "handlers start", "end": "handlers end",
               "done": "completed"}
WARMUP = 20


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``--child ARGS`` in the examples directory; its output goes to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, __file__, "--child", *args], cwd=EXAMPLES,
                                env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, -signal.SIGTERM):
        print(log.read_text()[-3000:], file=sys.stderr)


@contextlib.contextmanager
def example_database(example: Example) -> Iterator[str]:
    """A scratch database migrated by the example's own ``alembic upgrade head``."""
    with _scratch.scratch_database(f"bench_{example.package}") as url:
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"],
                       cwd=EXAMPLES / example.package, check=True, capture_output=True,
                       env={**os.environ, example.url_variable: url})
        yield url


# --------------------------------------------------------------------------------------------
# one measured run: web process + relay + requests


def one_run(variant: str, url: str, requests: int, rate: float) -> dict[str, list[float]]:
    """Latencies (ms) from each item's commit to each stage, for the measured requests."""
    import httpx

    example_name, handler = VARIANTS[variant]
    example = EXAMPLE[example_name]
    env = {example.url_variable: url, "OUTBOX_DATABASE_URL": url}
    with tempfile.TemporaryDirectory() as tmp:
        marks = Path(tmp) / "marks"
        port = free_port()
        web_log, relay_log = Path(tmp) / "web.log", Path(tmp) / "relay.log"
        web = child("web", example_name, str(port), str(marks), env=env, log=web_log)
        relay = child("relay", example_name, handler, str(marks), env=env, log=relay_log)
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, timeout=30) as client:
                _wait_for(client, web)
                email = f"bench-{time.time_ns()}@example.com"
                r = client.post("/signup", json={"email": email, "password": "bench"})
                r.raise_for_status()
                auth = {"Authorization": f"Bearer {r.json()['token']}"}
                measured: list[str] = []
                started = time.perf_counter()
                for i in range(WARMUP + requests):
                    delay = started + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    r = client.post("/items", json={"title": f"bench {i}"}, headers=auth)
                    r.raise_for_status()
                    if i >= WARMUP:
                        measured.append(str(r.json()["id"]))
            stamps = _wait_for_completion(marks, set(measured), relay)
        finally:
            stop(relay, relay_log)
            stop(web, web_log)
        stats_file = Path(f"{marks}.stats")
        relay_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    out: dict[str, list[float]] = {stage: [] for stage in STAGES}
    out["queued"] = []
    previous_done = 0.0
    for item in measured:
        seen = stamps.get(item, {})
        committed = seen.get("commit")
        if committed is None:
            raise SystemExit(f"{variant}: no commit time for item {item}")
        for stage in STAGES:
            if stage in seen:
                out[stage].append((seen[stage] - committed) * 1000)
        # 1 when the previous request's event was still in the relay's hands at this commit
        out["queued"].append(float(committed < previous_done))
        previous_done = seen.get("done", previous_done)
    total = WARMUP + requests + 3  # + the sign-up's user and token events, before the relay
    out["notifications_per_request"] = [relay_stats.get("notifications", 0) / total]
    missing = len(measured) - len(out["done"])
    if missing:
        print(f"  {variant}: {missing} of {len(measured)} items not completed", flush=True)
    return out


def _wait_for(client: Any, web: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            client.get("/docs")
            return
        except Exception:
            if web.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the web process did not start") from None
            time.sleep(0.1)


def _read_marks(path: Path) -> dict[str, dict[str, float]]:
    stamps: dict[str, dict[str, float]] = defaultdict(dict)
    if path.exists():
        for line in path.read_text().splitlines():
            kind, item, at = line.split()
            stamps[item].setdefault(kind, float(at))  # the first claim / completion counts
    return stamps


def _wait_for_completion(marks: Path, items: set[str],
                         relay: subprocess.Popen[bytes]) -> dict[str, dict[str, float]]:
    deadline = time.monotonic() + 30
    while True:
        stamps = _read_marks(marks)
        if all("done" in stamps.get(i, {}) for i in items):
            return stamps
        if relay.poll() is not None or time.monotonic() > deadline:
            return stamps
        time.sleep(0.2)


def baseline_c(seconds: float) -> dict[str, float]:
    """``python bench/relay.py --only c``: commit → no-op handler with NOTIFY on."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "c.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "relay.py"), "--only", "c",
                        "--seconds", str(seconds), "--json", str(out)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        on: dict[str, float] = json.loads(out.read_text())["c"]["notify_on"]
        return on


# --------------------------------------------------------------------------------------------
# child processes


def web_child(example_name: str, port: int, marks: str) -> None:
    """The example's app under uvicorn, noting each item's commit time."""
    import uvicorn
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    sys.path.insert(0, str(EXAMPLES))
    example = EXAMPLE[example_name]
    app = importlib.import_module(f"{example.package}.main").app
    item_class = importlib.import_module(f"{example.package}.models").Item
    log = open(marks, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    @event.listens_for(Session, "after_flush")
    def after_flush(session: Any, _context: Any) -> None:
        ids = [obj.id for obj in session.new if isinstance(obj, item_class)]
        if ids:
            session.info.setdefault("bench_items", []).extend(ids)

    @event.listens_for(Session, "after_commit")
    def after_commit(session: Any) -> None:
        ids = session.info.pop("bench_items", None)
        if ids:
            at = time.time()
            for item in ids:
                log.write(f"commit {item} {at}\n")

    @event.listens_for(Session, "after_rollback")
    def after_rollback(session: Any) -> None:
        session.info.pop("bench_items", None)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def relay_child(example_name: str, handler: str, marks: str) -> None:
    """``python -m outbox.relay --app <example>.handlers`` (its ``main()``, in this process), with
    probes around the handlers and hooks on claim and settle."""
    import outbox
    from outbox.relay import cli
    from outbox.relay.stats import RelayHooks

    sys.path.insert(0, str(EXAMPLES))
    example = EXAMPLE[example_name]
    log = open(marks, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    def note(kind: str, event: outbox.Event) -> None:
        if event.type == example.item_type:
            log.write(f"{kind} {event.entity_id} {time.time()}\n")

    async def probe_start(event: outbox.Event) -> None:
        note("start", event)

    async def probe_end(event: outbox.Event) -> None:
        note("end", event)

    outbox.subscribe(example.item_type, probe_start, name="bench_probe_start")
    if handler == "app":
        apps = [f"{example.package}.handlers"]
        importlib.import_module(apps[0])  # subscribed now: between the two probes
    else:
        apps = []
        _bench_handler(example, handler)
    outbox.subscribe(example.item_type, probe_end, name="bench_probe_end")

    class Marks(RelayHooks):
        def on_claim(self, claim: Any) -> None:
            for event in claim.events:
                note("claimed", event)

        def on_settled(self, outcomes: Any, lost: int) -> None:
            for outcome in outcomes:
                if outcome.status == "completed":
                    note("done", outcome.event)

    build = cli.build_relay
    made: list[Any] = []

    def build_relay(config: Any) -> Any:
        relay = build(config)
        relay.hooks.append(Marks())
        made.append(relay)
        return relay

    cli.build_relay = build_relay
    argv = [arg for app in apps for arg in ("--app", app)]
    code = cli.main(argv)
    if made:  # how the relay was woken: notifications received, claims made
        stats = made[0].stats
        Path(f"{marks}.stats").write_text(json.dumps(
            {"notifications": stats.notifications, "claims": stats.claims,
             "batches": stats.batches, "completed": stats.completed}))
    sys.exit(code)


def _bench_handler(example: Example, kind: str) -> None:
    """The ``def`` handlers of the variants that are not the example's own."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session, sessionmaker

    import outbox
    from outbox.inbox import record

    url = os.environ[example.url_variable]
    activity = importlib.import_module(f"{example.package}.models").Activity

    if kind == "noop":
        def noop(event: outbox.Event) -> None:
            return None

        outbox.subscribe(example.item_type, noop, name="bench_noop")
        return

    def write(session: Session, event: outbox.Event) -> None:
        if record(session, "activity", event.id):
            session.add(activity(user_id=event.payload["owner_id"], text="bench"))
            session.commit()

    if kind == "def":
        sync_session = sessionmaker(sa.create_engine(url))  # once, at import
        outbox.capture(sync_session)

        def record_activity(event: outbox.Event) -> None:
            with outbox.context(user_id=event.user_id), sync_session() as session:
                write(session, event)

        outbox.subscribe(example.item_type, record_activity, name="bench_def")
    elif kind == "engine-per-event":
        outbox.capture(Session)

        def per_event(event: outbox.Event) -> None:
            engine = sa.create_engine(url)  # a new engine (and connection) per event
            try:
                with outbox.context(user_id=event.user_id), Session(engine) as session:
                    write(session, event)
            finally:
                engine.dispose()

        outbox.subscribe(example.item_type, per_event, name="bench_engine_per_event")
    else:
        raise SystemExit(f"unknown handler {kind}")


# --------------------------------------------------------------------------------------------


def report(variant: str, rounds: list[dict[str, list[float]]]) -> dict[str, Any]:
    pooled = {stage: [v for r in rounds for v in r[stage]] for stage in STAGES}
    per_round = [round(pct(r["done"], 50), 2) for r in rounds if r["done"]]
    cells = []
    result: dict[str, Any] = {"per_round_completed_p50_ms": per_round}
    for stage in STAGES:
        values = pooled[stage]
        if not values:
            continue
        p50, p99 = pct(values, 50), pct(values, 99)
        result[stage] = {"p50_ms": p50, "p99_ms": p99, "n": len(values)}
        cells.append(f"{STAGE_NAMES[stage]} {p50:.1f}/{p99:.1f}")
    notified = [v for r in rounds for v in r["notifications_per_request"]]
    result["notifications_per_request"] = notified
    queued = [v for r in rounds for v in r["queued"]]
    result["committed_while_previous_in_hand"] = sum(queued) / max(1, len(queued))
    print(f"{variant:17s} commit → " + ", ".join(cells) + " ms (p50/p99); completed p50 per "
          f"round: {', '.join(f'{x:.1f}' for x in per_round)}; committed while the previous "
          f"item was in the relay's hands: {result['committed_while_previous_in_hand']:.0%}; "
          f"NOTIFYs received per request: {', '.join(f'{x:.2f}' for x in notified)}",
          flush=True)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "web":
            web_child(rest[0], int(rest[1]), rest[2])
        elif kind == "relay":
            relay_child(rest[0], rest[1], rest[2])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=300, help="measured requests per run")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second")
    p.add_argument("--baseline-seconds", type=float, default=10.0,
                   help="duration of each bench/relay.py (c) run")
    p.add_argument("--no-baseline", action="store_true", help="skip bench/relay.py (c)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")
    needed = {VARIANTS[v][0] for v in variants}
    # SIGTERM (e.g. from `timeout`) unwinds like ^C: child processes stopped, databases dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, list[dict[str, list[float]]]] = {v: [] for v in variants}
    baseline: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(example_database(EXAMPLE[name])) for name in needed}
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for variant in order:
                results[variant].append(one_run(variant, urls[VARIANTS[variant][0]],
                                                args.requests, args.rate))
            if not args.no_baseline:
                baseline.append(baseline_c(args.baseline_seconds))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n{args.requests} requests at {args.rate:g}/s per run, {args.rounds} rounds "
          "(p50/p99 over all rounds' events):")
    out: dict[str, Any] = {"requests": args.requests, "rate": args.rate, "rounds": args.rounds}
    for variant in variants:
        out[variant] = report(variant, results[variant])
    if baseline:
        p50s = [b["p50_ms"] for b in baseline]
        p99s = [b["p99_ms"] for b in baseline]
        print(f"{'bench/relay.py c':17s} commit → no-op async handler p50 per round "
              f"{', '.join(f'{x:.2f}' for x in p50s)} ms (median {statistics.median(p50s):.2f}),"
              f" p99 {', '.join(f'{x:.2f}' for x in p99s)} ms")
        out["relay_c"] = baseline
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
