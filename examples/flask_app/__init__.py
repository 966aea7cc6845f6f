"""A small Flask + Flask-SQLAlchemy application that uses outbox (see README.md next to this file).

``flask --app flask_app.app init-db`` creates the tables, ``flask --app flask_app.app run`` serves
it, ``python -m outbox.relay --app flask_app.handlers`` runs its handler.
"""
