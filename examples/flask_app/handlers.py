"""The relay's handlers: ``python -m outbox.relay --app flask_app.handlers``.

Handlers run outside any request: they use ``db.session`` inside an app context of their own.
The inbox row makes the effect exactly-once.
"""

from __future__ import annotations

import outbox
from flask_app.app import create_app
from flask_app.models import WordCount, db
from outbox.inbox import record

app = create_app()


@outbox.subscribe("*.notes.create")  # main.notes.create on SQLite, public.… on PostgreSQL
def count_words(event: outbox.Event) -> None:
    with app.app_context(), outbox.context(user_id=event.user_id):
        if not record(db.session, "word-counts", event.id):
            return  # handled before
        author = event.payload["author_id"]
        counts = db.session.get(WordCount, author) or WordCount(user_id=author, words=0)
        counts.words += len(event.payload["text"].split())
        db.session.add(counts)
        db.session.commit()
