"""A small Flask + Flask-SQLAlchemy application that uses outbox (see README.md next to this file).

``flask --app flask_app init-db`` creates the tables, ``flask --app flask_app run`` serves it,
``python -m outbox.relay --app flask_app.handlers`` runs its handler.
"""

from __future__ import annotations

from flask_app.app import create_app

__all__ = ["create_app"]
