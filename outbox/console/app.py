"""The console as an ASGI application: Starlette routes, Jinja2 pages, sign-in and CSRF.

Every page reads through :mod:`outbox.ops` and :mod:`outbox._sql.console` (no SQL here) on a
synchronous SQLAlchemy engine, in worker threads. See :func:`create_app` and docs/console.md.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any, TypeVar

import anyio
import jinja2
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from outbox import ops
from outbox._logs import redact as redact_text
from outbox._sql import console as console_sql
from outbox.console import views
from outbox.console.auth import SESSION_MAX_AGE, Credentials, Signer, Throttle, parse_basic
from outbox.console.redact import TOO_DEEP, Redactor
from outbox.events import EventFilter, EventStatus, utcnow
from outbox.exceptions import OutboxError

__all__ = ["Console", "create_app"]

log = logging.getLogger("outbox.console")

T = TypeVar("T")
#: Signs a request in from the host application's own authentication: the identity to record
#: for its actions, or ``None`` (not signed in).
Authenticate = Callable[[Request], "Awaitable[str | None] | str | None"]

SESSION_COOKIE = "outbox_session"
CSRF_COOKIE = "outbox_csrf"
MAX_FORM_BYTES = 256 * 1024
#: Known event types for the filter's suggestions are read again after this many seconds.
TYPES_TTL = 60.0
#: The type suggestions' query is cancelled after this many seconds (they are a decoration).
SUGGESTIONS_TIMEOUT = 1.0
#: Database connections the console uses at once, its own pool or the application's it is
#: mounted on: a slow database makes requests wait (then 503), not take every connection.
MAX_CONNECTIONS = 4
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml"}


class HTTPError(Exception):
    """A page that answers with an error status and a short message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _db_message(exc: sa.exc.DBAPIError) -> str:
    """The first line of a database error, URL secrets hidden."""
    first = str(exc.orig or exc).strip().splitlines()
    return redact_text(first[0] if first else type(exc).__name__)


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _loopback_host(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Console:
    """The console's state: database, who may sign in, what is hidden, what is allowed."""

    def __init__(
        self,
        database: Engine | str,
        *,
        credentials: Credentials | None = None,
        authenticate: Authenticate | None = None,
        no_auth: bool = False,
        read_only: bool = False,
        redact: Iterable[str] = (),
        secret: str | None = None,
        page_size: int = 50,
        query_timeout: float | None = 10.0,
    ) -> None:
        self.credentials = credentials or Credentials()
        if no_auth and (self.credentials.configured or authenticate is not None):
            raise OutboxError("console: no_auth together with credentials: choose one")
        if not (no_auth or self.credentials.configured or authenticate is not None):
            raise OutboxError(
                "console: no credentials configured (console.token, or console.username and "
                "console.password; OUTBOX_CONSOLE_TOKEN, …); to run without sign-in on "
                "127.0.0.1 only, say so with no_auth (--no-auth)"
            )
        if not 1 <= page_size <= 500:
            raise OutboxError("console: page_size must be between 1 and 500")
        self.authenticate = authenticate
        self.no_auth = no_auth
        self.read_only = read_only
        self.redactor = Redactor(redact)
        self.signer = Signer(secret, binding=self.credentials.fingerprint)
        self.throttle = Throttle()
        self.page_size = page_size
        self.query_timeout = query_timeout
        if isinstance(database, str):
            self.engine = sa.create_engine(database, pool_pre_ping=True,
                                           pool_size=MAX_CONNECTIONS, max_overflow=0)
            self._own_engine = True
        else:
            self.engine = database
            self._own_engine = False
        self._types: tuple[float, list[str]] | None = None
        self._types_refresh = anyio.Lock()
        self._connections = anyio.CapacityLimiter(MAX_CONNECTIONS)
        loader = jinja2.PackageLoader("outbox.console", "templates")
        self.templates = jinja2.Environment(loader=loader, autoescape=True,
                                            undefined=jinja2.StrictUndefined,
                                            finalize=views.visible)
        self.templates.filters.update(
            ts=views.timestamp, ago=views.ago, duration=views.duration, json=views.pretty_json,
            short_json=views.short_json,
        )
        self.templates.globals.update(
            filter_fields=views.FILTER_FIELDS, statuses=[s.value for s in EventStatus],
        )

    def close(self) -> None:
        if self._own_engine:
            self.engine.dispose()

    # -- database

    async def read(self, fn: Callable[..., T], *args: Any, budget: float | None = None,
                   **kwargs: Any) -> T:
        """``fn(connection, *args)`` in a worker thread, on a connection of its own, its
        statements cancelled after ``budget`` seconds (default: ``query_timeout``)."""
        def run() -> T:
            with self.engine.connect() as conn:
                console_sql.limit_time(conn, budget or self.query_timeout)
                return fn(conn, *args, **kwargs)

        return await self._in_thread(run)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(engine, *args)`` in a worker thread (functions that run their own
        transactions: the replays)."""
        return await self._in_thread(functools.partial(fn, self.engine, *args, **kwargs))

    async def _in_thread(self, run: Callable[[], T]) -> T:
        """``run()`` in a worker thread once one of ``MAX_CONNECTIONS`` slots is free; a
        request that waits longer than ``query_timeout`` for one gets 503."""
        with anyio.move_on_after(self.query_timeout or 30.0) as waited:
            await self._connections.acquire()
        if waited.cancelled_caught:
            raise HTTPError(503, "the console is busy: its database queries are slow; try "
                                 "again shortly")
        try:
            return await anyio.to_thread.run_sync(run)
        finally:
            self._connections.release()

    async def known_types(self) -> list[str]:
        """The type suggestions: a decoration, on a budget of its own. One refresh at a time
        (concurrent pages take the cached list); a refresh that fails or runs past
        ``SUGGESTIONS_TIMEOUT`` keeps the old list (or none) until the next ``TYPES_TTL`` —
        the page is served either way."""
        cached = self._types
        if cached is not None and time.monotonic() - cached[0] < TYPES_TTL:
            return cached[1]
        stale = cached[1] if cached is not None else []
        if self._types_refresh.locked():
            return stale
        async with self._types_refresh:
            try:
                types = await self.read(console_sql.known_types,
                                        budget=min(SUGGESTIONS_TIMEOUT,
                                                   self.query_timeout or SUGGESTIONS_TIMEOUT))
            except sa.exc.DBAPIError as exc:
                log.warning("console: type suggestions not refreshed (%s); using %d known "
                            "type(s) for %.0f s", _db_message(exc), len(stale), TYPES_TTL)
                types = stale
            self._types = (time.monotonic(), types)
        return types

    # -- who is asking

    async def identify(self, request: Request) -> str | None:
        if self.authenticate is not None:
            found = self.authenticate(request)
            if inspect.isawaitable(found):
                found = await found
            return None if found is None else str(found)
        header = request.headers.get("authorization", "")
        if header:
            basic = parse_basic(header)
            if basic is not None and self.credentials.check_password(*basic):
                self.throttle.succeeded(_client(request))
                return basic[0]
            scheme, _, token = header.partition(" ")
            if scheme.lower() == "bearer" and self.credentials.check_token(token.strip()):
                self.throttle.succeeded(_client(request))
                return "token"
            self.sign_in_failed(request, basic[0] if basic is not None else None)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            identity = self.signer.identity(cookie)
            if identity is not None:
                return identity
        return "anonymous" if self.no_auth else None

    def sign_in_failed(self, request: Request, username: str | None) -> None:
        client = _client(request)
        failures = self.throttle.failed(client)
        log.warning("console: failed sign-in%s from %s (%d in the last %.0f s)",
                    f" as {username!r}" if username else "", client, failures,
                    self.throttle.window)

    def masked_errors(self, conn: Connection, rows: Iterable[Any], *, error: str = "error",
                      ids: str | None = None, seqs: str | None = None) -> dict[Any, str | None]:
        """The ``error`` of each row with URL secrets and the event's hidden values masked,
        keyed by the row's id (``ids``) or seq (``seqs``) attribute."""
        rows = [r for r in rows if getattr(r, error)]
        sources: dict[Any, tuple[Any, Any]] = {}
        if self.redactor and rows:
            if ids is not None:
                sources = dict(console_sql.values_by_id(conn, [getattr(r, ids) for r in rows]))
            elif seqs is not None:
                sources = dict(console_sql.failed_values_by_seq(
                    conn, [getattr(r, seqs) for r in rows if getattr(r, seqs) is not None]))
        out = {}
        for r in rows:
            key = getattr(r, ids or seqs or error)
            out[key] = self.redactor.error(getattr(r, error), *sources.get(key, (None, None)))
        return out


# --------------------------------------------------------------------------------------------
# request plumbing


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _url(request: Request, path: str, query: Mapping[str, Any] | None = None) -> str:
    url = _root(request) + path
    if query:
        items = {k: str(v) for k, v in query.items() if v is not None and v != ""}
        if items:
            url += "?" + urllib.parse.urlencode(items)
    return url


def _who(request: Request, identity: str) -> str:
    return f"{identity} from {_client(request)}"


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (at most ``MAX_FORM_BYTES``)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPError(415, "expected a form (application/x-www-form-urlencoded)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPError(413, "form too large")
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                       max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed form") from None
    return dict(pairs)


class Page:
    """One request's rendering context: who, the CSRF nonce, the templates."""

    def __init__(self, console: Console, request: Request, identity: str | None) -> None:
        self.console = console
        self.request = request
        self.identity = identity
        existing = request.cookies.get(CSRF_COOKIE)
        self.new_nonce = not existing
        self.nonce = existing or Signer.nonce()

    @property
    def csrf(self) -> str:
        return self.console.signer.csrf_token(self.nonce, self.identity or "")

    def check_csrf(self, form: Mapping[str, str]) -> None:
        if not self.console.signer.check_csrf(self.request.cookies.get(CSRF_COOKIE),
                                              self.identity or "", form.get("csrf")):
            raise HTTPError(403, "the form's CSRF token is missing or wrong: reload the page "
                                 "and try again")

    def url(self, path: str, **query: Any) -> str:
        return _url(self.request, path, query)

    def finish(self, response: Response) -> Response:
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if self.new_nonce:
            response.set_cookie(CSRF_COOKIE, self.nonce, httponly=True, samesite="strict",
                                path=_root(self.request) or "/",
                                secure=self.request.url.scheme == "https")
        return response

    def render(self, template: str, status: int = 200, **context: Any) -> Response:
        c = self.console
        html = c.templates.get_template(template).render(
            url=self.url, csrf=self.csrf, identity=self.identity, read_only=c.read_only,
            sign_out=self.identity is not None and c.authenticate is None and not c.no_auth,
            now=utcnow(), chart=views.bar_chart, **context,
        )
        return self.finish(HTMLResponse(html, status_code=status))

    def redirect(self, path: str, **query: Any) -> Response:
        return self.finish(RedirectResponse(self.url(path, **query), status_code=303))


Handler = Callable[[Page], Awaitable[Response]]


def _wants_html(request: Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def endpoint(console: Console, handler: Handler, *, public: bool = False,
             action: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a page handler: sign-in check, CSRF check for actions, read-only mode, errors as
    pages (a database error is one line, its URL's password hidden)."""

    async def run(request: Request) -> Response:
        if console.no_auth and not (_loopback_host(request.url.hostname or "")
                                    and _loopback_host(_client(request))):
            # Without sign-in only a browser on this machine may talk to us: a page that
            # rebinds its own host name to 127.0.0.1 sends another Host header, and a remote
            # client can send any Host header but not another peer address.
            return Response("console without sign-in: use http://127.0.0.1 on this machine",
                            status_code=421)
        wait = console.throttle.wait(_client(request))
        if wait and (request.headers.get("authorization")
                     or (request.url.path.endswith("/login") and request.method == "POST")):
            return Response("too many failed sign-ins: try again later", status_code=429,
                            headers={"Retry-After": str(int(wait) + 1)})
        identity = await console.identify(request)
        page = Page(console, request, identity)
        try:
            if identity is None and not public:
                return _unauthenticated(page)
            if action and console.read_only:
                raise HTTPError(403, "the console runs read-only (--read-only)")
            return await handler(page)
        except HTTPError as exc:
            return page.render("error.html", status=exc.status, message=exc.message)
        except sa.exc.TimeoutError:  # no connection from the pool in time
            return page.render("error.html", status=503, message=(
                "the database has no free connection for the console: try again shortly"))
        except RecursionError:  # an event's JSON nested deeper than the driver decodes
            return page.render("error.html", status=422, message=(
                "an event on this page holds JSON nested deeper than can be read (written by "
                "SQL outside outbox?); open the events one by one"))
        except sa.exc.DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) == "57014":  # query_canceled: the timeout
                return page.render("error.html", status=504, message=(
                    f"the query took longer than {console.query_timeout:g} s: narrow the "
                    "filter (a time range, a type, a user, an entity)"))
            message = _db_message(exc)
            log.warning("console: database error on %s: %s", request.url.path, message)
            return page.render("error.html", status=503, message=f"database: {message}")

    return run


def _unauthenticated(page: Page) -> Response:
    console, request = page.console, page.request
    if console.authenticate is not None:
        return page.render("error.html", status=401, message="not signed in")
    if _wants_html(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return page.redirect("/login", next=target)
    response = page.render("error.html", status=401, message="sign in first")
    challenges = []
    if console.credentials.username is not None:
        challenges.append('Basic realm="outbox console", charset="UTF-8"')
    if console.credentials.token is not None:
        challenges.append('Bearer realm="outbox console"')
    response.headers["WWW-Authenticate"] = ", ".join(challenges)
    return response


def _safe_next(request: Request, target: str | None) -> str:
    """Only paths of this console as redirect targets (no open redirect)."""
    root = _root(request)
    if target and target.startswith((root + "/") if root else "/") and \
            not target.startswith("//") and "\\" not in target:
        return target
    return root + "/"


# --------------------------------------------------------------------------------------------
# pages


def _cursor(page: Page, name: str) -> console_sql.Cursor | None:
    text = page.request.query_params.get(name)
    if not text:
        return None
    try:
        return console_sql.Cursor.parse(text)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


async def events_page(page: Page) -> Response:
    c = page.console
    query = page.request.query_params
    try:
        form = views.FilterForm.parse(query)
    except ValueError as exc:
        form = views.FilterForm({n: query.get(n, "") for n, _, _ in views.FILTER_FIELDS},
                                EventFilter())
        return page.render("events.html", status=400, form=form, error=str(exc), rows=[],
                           errors={}, newer=None, older=None, types=await c.known_types())
    before, after = _cursor(page, "before"), _cursor(page, "after")
    if before is not None and after is not None:
        raise HTTPError(400, "give before or after, not both")
    def read(conn: Connection) -> tuple[console_sql.TrailPage, dict[Any, str | None]]:
        result = console_sql.trail_page(conn, form.filter, before=before, after=after,
                                        limit=c.page_size)
        return result, c.masked_errors(conn, result.rows, ids="id")

    result, errors = await c.read(read)
    return page.render("events.html", form=form, error=None, rows=result.rows, errors=errors,
                       newer=result.newer, older=result.older, types=await c.known_types())


async def event_page(page: Page) -> Response:
    c = page.console
    event_id = views.parse_uuid(page.request.path_params["event_id"])
    unreadable = False
    try:
        event = None if event_id is None else await c.read(ops.get_event, event_id)
    except RecursionError:  # JSON nested deeper than the driver's decoder goes
        event = await c.read(console_sql.event_without_json, event_id)
        unreadable = True
    if event is None:
        raise HTTPError(404, "no such event")
    meta = event.meta or {}
    return page.render(
        "event.html", event=event,
        payload=TOO_DEEP if unreadable else c.redactor("payload", event.payload),
        metadata=TOO_DEEP if unreadable else c.redactor("metadata", meta),
        trace_id=views.trace_id(meta),
        handled=views.handled(meta), error=c.redactor.error(event.error, event.payload, meta),
        message=views.DONE.get(page.request.query_params.get("done", "")),
    )


async def replay_event(page: Page) -> Response:
    c = page.console
    form = await _form(page.request)
    page.check_csrf(form)
    event_id = views.parse_uuid(page.request.path_params["event_id"])
    if event_id is None:
        raise HTTPError(404, "no such event")
    result = await c.call(ops.replay, ids=[event_id])
    if result.missing:
        raise HTTPError(404, "no such event")
    if result.skipped:
        done = f"not-failed-{result.skipped[event_id]}"
    else:
        done = "replayed"
        log.warning("console: %s replayed event %s", _who(page.request, page.identity or ""),
                    event_id)
    return page.redirect(f"/events/{event_id}", done=done)


async def entity_page(page: Page) -> Response:
    c = page.console
    q = page.request.query_params
    entity, entity_id = q.get("entity", "").strip(), q.get("id", "").strip()
    schema = q.get("schema", "").strip() or None
    if not entity or not entity_id:
        raise HTTPError(400, "give entity and id")
    if "\x00" in entity + entity_id + (schema or ""):
        raise HTTPError(400, "entity, id and schema cannot contain NUL characters")
    before = q.get("before")
    try:
        before_seq = int(before) if before else None
    except ValueError:
        before_seq = -1
    if before_seq is not None and not 0 < before_seq < 2**63:  # seq is a BIGINT
        raise HTTPError(400, f"invalid before {before!r}: a seq from this page's links")
    entries, older = await c.read(console_sql.entity_timeline, entity, entity_id,
                                  schema_name=schema, before_seq=before_seq, limit=c.page_size)
    shown = [
        {"entry": e, "changes": c.redactor.changes(e.changes),
         "payload": c.redactor("payload", e.payload)}
        for e in entries
    ]
    return page.render("entity.html", entity=entity, entity_id=entity_id, schema=schema,
                       entries=shown, older=older)


async def failures_page(page: Page) -> Response:
    c = page.console

    def read(conn: Connection) -> dict[str, Any]:
        groups = console_sql.failure_groups(conn)
        blocked = console_sql.blocked_key_details(conn)
        return {"groups": groups, "blocked": blocked,
                "group_errors": c.masked_errors(conn, groups, seqs="sample_seq"),
                "blocked_errors": c.masked_errors(conn, blocked, error="holder_error",
                                                  seqs="holder_seq"),
                "failed": console_sql.failed_count(conn), "scan": console_sql.FAILURE_SCAN}

    return page.render("failures.html", **await c.read(read))


#: A failure group is looked for among this many groups of the failures page's scan.
GROUP_LOOKUP = 1000


def _find_group(conn: Connection, form: Mapping[str, str]) -> console_sql.FailureGroup:
    """The group a form names: by its key (what the failures page sends), or by type and
    error text (scripts; the browser's CRLF line breaks read as the LF errors have)."""
    key = form.get("group", "")
    type_ = form.get("type", "")
    if not key and not type_:
        raise HTTPError(400, "no failure group given")
    groups = console_sql.failure_groups(conn, limit=GROUP_LOOKUP)
    if not key:
        error = None if form.get("no_error") == "1" else form.get("error", "")
        wanted = {(type_, error), (type_, error.replace("\r\n", "\n") if error else error)}
        found = [g for g in groups if (g.type, g.error) in wanted]
    else:
        found = [g for g in groups if g.key == key]
    if not found:
        raise HTTPError(404, "no such failure group among the failed events now: reload the "
                             "failures page")
    return found[0]


async def replay_group(page: Page) -> Response:
    c = page.console
    form = await _form(page.request)
    page.check_csrf(form)

    confirmed = form.get("confirm") == "yes"

    def find(conn: Connection) -> tuple[console_sql.FailureGroup, int, str | None]:
        group = _find_group(conn, form)
        if confirmed:  # the preview's count and text are not shown again
            return group, 0, None
        shown = c.masked_errors(conn, [group], seqs="sample_seq").get(group.sample_seq)
        return group, console_sql.failure_group_count(conn, group.type, group.error), shown

    group, count, shown = await c.read(find)
    type_, error = group.type, group.error
    if not confirmed:
        return page.render("replay_confirm.html", count=count, what="group", type=type_,
                           error=shown, no_error=error is None,
                           hidden={"type": type_, "group": group.key},
                           action=page.url("/failures/replay"))
    result = await c.call(console_sql.replay_failure_group, type_, error)
    log.warning("console: %s replayed %d failed %s event(s) with error %r",
                _who(page.request, page.identity or ""), result.replayed, type_,
                (c.redactor.error(error) or "")[:200])
    return page.render("replay_done.html", result=result, back=page.url("/failures"))


async def replay_matching(page: Page) -> Response:
    c = page.console
    form = await _form(page.request)
    page.check_csrf(form)
    try:
        parsed = views.FilterForm.parse(form)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None
    if parsed.filter.status != EventStatus.FAILED.value:
        raise HTTPError(400, "replay moves failed events only: filter by status failed")
    # since/until as absolute times, so the confirmation replays what the preview counted.
    hidden = dict(parsed.active)
    for name, value in (("since", parsed.filter.start_time), ("until", parsed.filter.end_time)):
        if value is not None:
            hidden[name] = value.isoformat()
    if form.get("confirm") != "yes":
        preview = await c.call(ops.replay, filter=parsed.filter, dry_run=True)
        return page.render("replay_confirm.html", count=preview.replayed, what="filter",
                           filters=parsed.active, hidden=hidden, action=page.url("/replay"))
    result = await c.call(ops.replay, filter=parsed.filter)
    log.warning("console: %s replayed %d failed event(s) matching %s",
                _who(page.request, page.identity or ""), result.replayed,
                " ".join(f"{k}={v!r}" for k, v in parsed.active.items()))
    return page.render("replay_done.html", result=result,
                       back=page.url("/events", **parsed.active))


async def health_page(page: Page) -> Response:
    c = page.console
    def read(conn: Connection) -> tuple[console_sql.HealthFigures, dict[Any, str | None]]:
        figures = console_sql.health_figures(conn)
        return figures, c.masked_errors(conn, figures.dead_letters, ids="event_id")

    figures, errors = await c.read(read)
    template = "health_live.html" if page.request.query_params.get("live") else "health.html"
    return page.render(template, f=figures, lag=figures.backlog.lag_seconds(figures.now),
                       dead_letter_errors=errors)


async def login_page(page: Page) -> Response:
    c = page.console
    target = _safe_next(page.request, page.request.query_params.get("next"))
    if c.authenticate is not None or c.no_auth:
        return page.redirect("/")
    if page.request.method == "GET":
        return page.render("login.html", error=None, next=target, creds=c.credentials)
    form = await _form(page.request)
    page.check_csrf(form)
    target = _safe_next(page.request, form.get("next"))
    identity = None
    if form.get("token") and c.credentials.check_token(form["token"]):
        identity = "token"
    elif form.get("username") and c.credentials.check_password(form["username"],
                                                              form.get("password", "")):
        identity = form["username"]
    if identity is None:
        c.sign_in_failed(page.request, form.get("username") or None)
        await anyio.sleep(0.5)  # slows guessing down
        return page.render("login.html", status=401, error="wrong credentials", next=target,
                           creds=c.credentials)
    c.throttle.succeeded(_client(page.request))
    log.info("console: %s signed in", _who(page.request, identity))
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, c.signer.session(identity), max_age=SESSION_MAX_AGE,
                        httponly=True, samesite="lax", path=_root(page.request) or "/",
                        secure=page.request.url.scheme == "https")
    return page.finish(response)


async def logout(page: Page) -> Response:
    form = await _form(page.request)
    page.check_csrf(form)
    cookie = page.request.cookies.get(SESSION_COOKIE)
    if cookie:
        page.console.signer.revoke(cookie)  # the cookie stops working, also if it was copied
    response = page.redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path=_root(page.request) or "/")
    return response


async def home(page: Page) -> Response:
    return page.redirect("/events")


_STATIC: dict[str, bytes] = {}


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    suffix = name[name.rfind("."):] if "." in name else ""
    if "/" in name or suffix not in _STATIC_TYPES:
        return Response("not found", status_code=404)
    if name not in _STATIC:
        try:
            _STATIC[name] = resources.files("outbox.console").joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return Response("not found", status_code=404)
    return Response(_STATIC[name], media_type=_STATIC_TYPES[suffix],
                    headers={"Cache-Control": "max-age=3600",
                             "X-Content-Type-Options": "nosniff"})


def create_app(
    database: Engine | str,
    *,
    token: str | None = None,
    username: str | None = None,
    password: str | None = None,
    authenticate: Authenticate | None = None,
    no_auth: bool = False,
    read_only: bool = False,
    redact: Iterable[str] = (),
    secret: str | None = None,
    page_size: int = 50,
    query_timeout: float | None = 10.0,
) -> Starlette:
    """The console as an ASGI app, to serve or mount (``app.mount("/outbox", …)``).

    ``database``: a synchronous SQLAlchemy ``Engine`` (shared, not disposed) or a URL. Sign-in
    with ``token`` and/or ``username`` + ``password``; or ``authenticate(request)`` returning
    the identity from your application's own authentication (``None``: refused); ``no_auth``
    only for a console reachable from this machine alone. ``read_only`` hides and refuses
    replays; ``redact`` lists JSON paths never shown (``payload.password``); ``secret`` signs
    sessions and CSRF tokens (set it when several processes serve the console);
    ``query_timeout`` cancels a page's query after that many seconds (PostgreSQL).
    """
    console = Console(
        database, credentials=Credentials(token=token, username=username, password=password),
        authenticate=authenticate, no_auth=no_auth, read_only=read_only, redact=redact,
        secret=secret, page_size=page_size, query_timeout=query_timeout,
    )

    def route(path: str, handler: Handler, methods: tuple[str, ...] = ("GET",),
              **options: bool) -> Route:
        return Route(path, endpoint(console, handler, **options), methods=list(methods))

    routes = [
        route("/", home),
        route("/events", events_page),
        route("/events/{event_id}", event_page),
        route("/events/{event_id}/replay", replay_event, ("POST",), action=True),
        route("/entity", entity_page),
        route("/failures", failures_page),
        route("/failures/replay", replay_group, ("POST",), action=True),
        route("/replay", replay_matching, ("POST",), action=True),
        route("/health", health_page),
        route("/login", login_page, ("GET", "POST"), public=True),
        route("/logout", logout, ("POST",)),
        Route("/static/{name}", static),
    ]
    app = Starlette(routes=routes)
    app.state.console = console
    return app


def started(console: Console) -> str:
    """How the console signs people in (for the start-up line; names no secret)."""
    if console.no_auth:
        return "no sign-in (127.0.0.1 only)"
    if console.authenticate is not None:
        return "the application's sign-in"
    return "sign-in with " + " or ".join(console.credentials.kinds)
