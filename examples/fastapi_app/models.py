"""Tables (SQLModel). The events of a table are ``public.<table>.create|update|delete``."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel
from sqlmodel import Field, SQLModel


class User(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(unique=True, index=True, max_length=255)
    full_name: str | None = Field(default=None, max_length=255)
    hashed_password: str = Field(max_length=255)


class ApiToken(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    token: str = Field(unique=True, max_length=64)  # left out of events: looks like a secret
    user_id: int = Field(foreign_key="user.id", index=True)


class Item(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    title: str = Field(max_length=255)
    owner_id: int = Field(foreign_key="user.id", index=True)


class Activity(SQLModel, table=True):
    """Written by the ``item.create`` handler (handlers.py), once per event."""

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="user.id", index=True)
    text: str = Field(max_length=500)
    at: dt.datetime = Field(default_factory=lambda: dt.datetime.now(dt.UTC))


class SignUp(BaseModel):
    email: str
    password: str
    full_name: str | None = None


class NewItem(BaseModel):
    title: str
