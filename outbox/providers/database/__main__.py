"""``python -m outbox.providers.database``: consumer groups of the database bus.

- ``groups`` — every group with its position, snapshot and claims in flight;
- ``delete-group NAME`` — forget a group (its next consumer creates it anew at ``--from``);
- ``rebase --from TIME|beginning|now`` / ``rebase --keep-positions`` — re-anchor every group
  after the database moved to another PostgreSQL cluster (docs/database-provider.md, 'Restore').

The database URL comes from ``--database-url`` or ``OUTBOX_DATABASE_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import sqlalchemy as sa

from outbox._sql import bus as sql
from outbox.exceptions import OutboxError
from outbox.providers.database.provider import parse_start
from outbox.providers.database.rebase import rebase


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m outbox.providers.database",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_DATABASE_URL"),
                        help="SQLAlchemy URL (default: $OUTBOX_DATABASE_URL)")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = sub.add_parser("groups", help="list consumer groups")
    groups.add_argument("--json", action="store_true")
    delete = sub.add_parser("delete-group", help="forget a consumer group")
    delete.add_argument("name")
    reb = sub.add_parser("rebase", help="re-anchor groups after a restore into another cluster")
    how = reb.add_mutually_exclusive_group(required=True)
    how.add_argument("--from", dest="since", help="beginning, now or an ISO 8601 time: events "
                     "created since then are delivered again")
    how.add_argument("--keep-positions", action="store_true",
                     help="after pg_upgrade (transaction ids continued): keep every position")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.database_url:
        print("error: no database URL (--database-url or OUTBOX_DATABASE_URL)", file=sys.stderr)
        return 2
    engine = sa.create_engine(args.database_url)
    try:
        if args.command == "groups":
            with engine.connect() as conn:
                found = sql.list_groups(conn)
            if args.json:
                print(json.dumps([{"group": g.name, "position": g.position,
                                   "snapshot": g.cursor.snapshot, "batch": g.cursor.batch,
                                   "claimed": g.cursor.seq, "claims": g.claims,
                                   "cluster_id": g.cluster_id,
                                   "updated_at": g.updated_at.isoformat()} for g in found]))
            else:
                for g in found:
                    print(f"{g.name}\tposition={g.position[0]}:{g.position[1]}\t"
                          f"snapshot={g.cursor.snapshot or '-'}\tclaims={g.claims}\t"
                          f"updated={g.updated_at.isoformat()}")
            return 0
        if args.command == "delete-group":
            with engine.begin() as conn:
                deleted = sql.delete_group(conn, args.name)
            print("deleted" if deleted else f"no group {args.name!r}")
            return 0 if deleted else 1
        since = None if args.keep_positions else parse_start(args.since)
        report = rebase(engine, since=since, keep_positions=args.keep_positions)
        print(f"rebased {len(report.groups)} group(s); {report.restamped} event rows restamped")
        for name, pos in report.positions.items():
            print(f"{name}\tposition=0:{pos[1]}")
        return 0
    except (OutboxError, ValueError, sa.exc.SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
