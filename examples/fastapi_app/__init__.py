"""A small FastAPI + SQLModel application that uses outbox (see README.md next to this file)."""
