"""Re-anchor consumer groups after the database moved to another PostgreSQL cluster.

Positions are transaction ids, which belong to one cluster. After a dump/restore into another
cluster the counter starts again from a low value: new events would sort *before* the groups'
positions and be skipped, which is why consumers refuse to run (:class:`ClusterChanged`) until
this is done. ``rebase`` rewrites ``txid`` of every existing row to 0 (in small batches; rows
keep their ``seq`` order), then sets every group to the position just before the first event
created at ``since`` (events from then on are delivered again; consumers dedupe by id). New
transactions have ids above 0, so everything written from now on sorts after the old rows.

After ``pg_upgrade`` transaction ids continue (only the system identifier changes):
``keep_positions=True`` checks that and just records the new cluster.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa

from outbox._sql import bus as sql
from outbox._sql import events as event_sql
from outbox._sql.bus import BEGINNING, ClusterChanged, Position
from outbox.exceptions import ProviderError
from outbox.providers.base import StartPosition

__all__ = ["RebaseReport", "rebase"]


@dataclass
class RebaseReport:
    """What :func:`rebase` did."""

    groups: list[str] = field(default_factory=list)
    restamped: int = 0
    positions: dict[str, Position] = field(default_factory=dict)


def rebase(
    engine: sa.Engine,
    *,
    since: dt.datetime | StartPosition | None = None,
    keep_positions: bool = False,
    batch_size: int = 5000,
) -> RebaseReport:
    """Re-anchor every consumer group in the current cluster (stop their consumers first).

    ``since``: a datetime (deliver again every event created at or after it), ``BEGINNING``
    (everything) or ``NOW`` (nothing that exists now). ``keep_positions``: after pg_upgrade only.
    """
    if engine.dialect.name != "postgresql":
        raise ProviderError("rebase is for PostgreSQL: other dialects have no transaction ids")
    if keep_positions == (since is not None):
        raise ValueError("give either since=... or keep_positions=True")
    report = RebaseReport()
    with engine.begin() as conn:
        cluster = sql.cluster_id(conn)
        report.groups = [g.name for g in sql.list_groups(conn)]
        if keep_positions:
            nx = sql.next_xid(conn)
            highest = sql.max_position_txid(conn)
            if highest >= nx:
                raise ClusterChanged(
                    f"a consumer group is positioned at transaction id {highest} but this "
                    f"cluster has only reached {nx}: transaction ids did not continue (a dump/"
                    "restore, not pg_upgrade). Rebase with --from TIME instead."
                )
            sql.stamp_cluster(conn, report.groups, cluster)
            return report
        last = event_sql.max_seq(conn)
    while True:
        with engine.begin() as conn:
            done = sql.restamp_batch(conn, last, batch_size)
        report.restamped += done
        if done == 0:
            break
    with engine.begin() as conn:
        for name in report.groups:
            position = _position(conn, since, last)
            sql.rebase_group(conn, name, position, cluster)
            report.positions[name] = position
    return report


def _position(conn: sa.Connection, since: dt.datetime | StartPosition | None,
              last: int) -> Position:
    if isinstance(since, dt.datetime):
        when = since if since.tzinfo else since.replace(tzinfo=dt.UTC)
        first = sql.first_seq_since(conn, when)
        return (0, last) if first is None or first > last else (0, first - 1)
    if since is not None and StartPosition(since) is StartPosition.BEGINNING:
        return BEGINNING
    return (0, last)
