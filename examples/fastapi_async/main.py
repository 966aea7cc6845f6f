"""The application: ``uvicorn fastapi_async.main:app`` (from the examples directory)."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import FastAPI, HTTPException
from sqlalchemy import select

import outbox.asgi
from fastapi_async.deps import CurrentUser, SessionDep
from fastapi_async.models import ApiToken, Item, ItemOut, NewItem, SignUp, User

app = FastAPI(title="outbox FastAPI example (async SQLAlchemy)")
# One request scope per request: the acting user holds until the request ends and never leaks
# into another request.
app.add_middleware(outbox.asgi.ContextMiddleware)


def hash_password(password: str) -> str:
    salt = secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 10_000).hex()
    return f"pbkdf2_sha256${salt}${digest}"


@app.post("/signup", status_code=201)
async def signup(body: SignUp, session: SessionDep) -> dict[str, object]:
    if (await session.scalars(select(User).where(User.email == body.email))).first():
        raise HTTPException(409, "email already registered")
    user = User(email=body.email, full_name=body.full_name,
                hashed_password=hash_password(body.password))
    session.add(user)
    await session.flush()  # the user's id, for the token
    token = ApiToken(token=secrets.token_hex(16), user_id=user.id)
    session.add(token)
    await session.commit()  # anonymous: the events of a signup have no acting user
    return {"id": user.id, "token": token.token}


@app.post("/items", status_code=201)
async def create_item(body: NewItem, session: SessionDep, user: CurrentUser) -> ItemOut:
    item = Item(title=body.title, owner_id=user.id)
    session.add(item)
    await session.commit()  # the row and its public.items.create event, one transaction
    return ItemOut.model_validate(item)


@app.patch("/items/{item_id}")
async def rename_item(item_id: int, body: NewItem, session: SessionDep,
                      user: CurrentUser) -> ItemOut:
    item = await session.get(Item, item_id)
    if item is None or item.owner_id != user.id:
        raise HTTPException(404, "no such item")
    item.title = body.title
    await session.commit()  # public.items.update, metadata.changes = {"title": {old, new}}
    return ItemOut.model_validate(item)
