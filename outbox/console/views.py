"""What the console's templates need besides the query results: form values → filters, text
formatting, the throughput chart as inline SVG. No SQL and no web framework here."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape

from outbox._duration import parse_time
from outbox._sql.console import ThroughputBucket
from outbox.console.redact import TOO_DEEP, too_deep
from outbox.events import EventFilter, EventSource, EventStatus, Operation, utcnow

__all__ = [
    "DONE",
    "FILTER_FIELDS",
    "FilterForm",
    "ago",
    "bar_chart",
    "pretty_json",
    "timestamp",
    "trace_id",
    "visible",
]

#: Filter fields of the trail's form: (query name, label, choices or None).
FILTER_FIELDS: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("type", "type", None),
    ("status", "status", tuple(s.value for s in EventStatus)),
    ("source", "source", tuple(s.value for s in EventSource)),
    ("user_id", "user", None),
    ("session_id", "session", None),
    ("instance_id", "instance", None),
    ("schema_name", "schema", None),
    ("entity", "entity", None),
    ("entity_id", "entity id", None),
    ("operation", "operation", tuple(o.value for o in Operation)),
    ("since", "since", None),
    ("until", "until", None),
)
_LONGEST = 500

#: The notices an action's redirect may show (``?done=<code>``): fixed texts, so a link cannot
#: make the console say what its author wants.
DONE: dict[str, str] = {
    "replayed": "replayed: pending again, due now, retry count reset",
    **{f"not-failed-{s.value}": f"not replayed: the event is {s.value}, not failed"
       for s in EventStatus},
}

# Characters that reorder or hide what follows them (bidi overrides and isolates, marks,
# zero-width characters) and C0/C1 controls other than tab and line breaks: shown as their code
# (``\u202e``) so ``\u202eadmin`` cannot display as "nimda".
_INVISIBLE = re.compile("[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f"
                        "\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


@dataclass(frozen=True)
class FilterForm:
    """The trail's filter as submitted (``values``) and as an :class:`EventFilter`."""

    values: dict[str, str]
    filter: EventFilter

    @classmethod
    def parse(cls, query: Mapping[str, str], now: dt.datetime | None = None) -> FilterForm:
        """Empty fields do not filter; ``ValueError`` naming the field for a bad value."""
        values = {name: str(query.get(name, "")).strip() for name, _, _ in FILTER_FIELDS}
        kwargs: dict[str, Any] = {}
        for name, label, choices in FILTER_FIELDS:
            text = values[name]
            if not text:
                continue
            if len(text) > _LONGEST:
                raise ValueError(f"{label}: longer than {_LONGEST} characters")
            if "\x00" in text:  # no text column can hold one: PostgreSQL refuses the query
                raise ValueError(f"{label}: cannot contain NUL characters")
            if choices is not None and text not in choices:
                raise ValueError(f"{label}: must be one of {', '.join(choices)}")
            if name in ("since", "until"):
                try:
                    kwargs["start_time" if name == "since" else "end_time"] = parse_time(text, now)
                except ValueError as exc:
                    raise ValueError(f"{label}: {exc}") from None
            else:
                kwargs[name] = text
        try:
            f = EventFilter(**kwargs)
        except ValueError as exc:
            raise ValueError(f"type: {exc}") from None
        return cls(values, f)

    @property
    def active(self) -> dict[str, str]:
        """The fields that are set (for links and hidden form fields)."""
        return {k: v for k, v in self.values.items() if v}


def visible(value: Any) -> Any:
    """Every value a template prints: invisible and reordering characters spelled out (markup
    the console built itself is left as it is)."""
    if isinstance(value, str) and not isinstance(value, Markup) and _INVISIBLE.search(value):
        return _INVISIBLE.sub(lambda m: f"\\u{ord(m[0]):04x}", value)
    return value


def timestamp(value: dt.datetime | None) -> str:
    """UTC, to the second (``""`` for ``None``)."""
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """``"3 s"``, ``"4 min"``, ``"2 h"``, ``"5 d"`` (``""`` for ``None``)."""
    if value is None:
        return ""
    return duration(((now or utcnow()) - value).total_seconds())


def duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def pretty_json(value: Any) -> str:
    if too_deep(value):
        return TOO_DEEP
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def short_json(value: Any, width: int = 80) -> str:
    if too_deep(value):
        return TOO_DEEP
    text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def trace_id(metadata: Mapping[str, Any] | None) -> str | None:
    """The trace id of a W3C ``traceparent`` in the metadata (``None`` without one)."""
    parent = (metadata or {}).get("traceparent")
    if not isinstance(parent, str):
        return None
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def handled(metadata: Mapping[str, Any] | None) -> list[str]:
    """Names of the handlers that already succeeded (``metadata.outbox.handled``)."""
    box = (metadata or {}).get("outbox")
    names = box.get("handled") if isinstance(box, Mapping) else None
    return [str(n) for n in names] if isinstance(names, list) else []


def parse_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def bar_chart(buckets: Sequence[ThroughputBucket], *, width: int = 720, height: int = 160,
              now: dt.datetime | None = None) -> Markup:
    """Events per bucket as an inline SVG bar chart (no script, no external resource)."""
    top = max((b.events for b in buckets), default=0)
    scale = max(top, 1)
    left, plot_h = 48, height - 28
    gap = 1
    bar_w = max(1.0, (width - left) / max(len(buckets), 1) - gap)
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="events written per interval">',
        f'<line class="axis" x1="{left}" y1="{plot_h + 4}" x2="{width}" y2="{plot_h + 4}"/>',
        f'<text class="label" x="{left - 6}" y="12" text-anchor="end">{top:,}</text>',
        f'<text class="label" x="{left - 6}" y="{plot_h + 4}" text-anchor="end">0</text>',
    ]
    for i, b in enumerate(buckets):
        h = 0 if b.events == 0 else max(1.0, plot_h * b.events / scale)
        x = left + i * (bar_w + gap)
        tip = f"{timestamp(b.start)} to {timestamp(b.end)[11:]} UTC: {b.events:,} events"
        if not b.exact:
            tip += " (estimated)"
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{plot_h + 4 - h:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}"><title>{escape(tip)}</title></rect>'
        )
    if buckets:
        first, last = buckets[0].start, buckets[-1].end
        parts.append(f'<text class="label" x="{left}" y="{height - 4}">'
                     f'{escape(ago(first, now))} ago</text>')
        parts.append(f'<text class="label" x="{width}" y="{height - 4}" text-anchor="end">'
                     f'{escape(timestamp(last)[11:])} UTC</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
