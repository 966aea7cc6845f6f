"""The application: ``uvicorn fastapi_app.main:app`` (from the examples directory)."""

from __future__ import annotations

import hashlib
import secrets

from fastapi import FastAPI, HTTPException
from sqlmodel import func, select

import outbox.asgi
from fastapi_app.db import AsyncSessionLocal
from fastapi_app.deps import CurrentUser, CurrentUserAsync, SessionDep
from fastapi_app.models import ApiToken, Item, NewItem, SignUp, User

MAX_ITEMS = 100

app = FastAPI(title="outbox FastAPI example")
# One request scope per request: the acting user holds until the request ends (a session
# dependency that commits on exit, background tasks) and never leaks into another request.
app.add_middleware(outbox.asgi.ContextMiddleware)


def hash_password(password: str) -> str:
    salt = secrets.token_hex(8)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), 10_000).hex()
    return f"pbkdf2_sha256${salt}${digest}"


@app.post("/signup", status_code=201)
def signup(body: SignUp, session: SessionDep) -> dict[str, object]:
    if session.exec(select(User).where(User.email == body.email)).first() is not None:
        raise HTTPException(409, "email already registered")
    user = User(email=body.email, full_name=body.full_name,
                hashed_password=hash_password(body.password))
    session.add(user)
    session.flush()  # the user's id, for the token
    assert user.id is not None
    token = ApiToken(token=secrets.token_hex(16), user_id=user.id)
    session.add(token)
    session.commit()  # anonymous: the events of a signup have no acting user
    return {"id": user.id, "token": token.token}


@app.post("/items", status_code=201)
def create_item(body: NewItem, session: SessionDep, user: CurrentUser) -> Item:
    item = Item(title=body.title, owner_id=user.id)
    session.add(item)
    session.commit()
    session.refresh(item)
    return item


@app.post("/items/async", status_code=201)
async def create_item_async(body: NewItem, user: CurrentUserAsync) -> Item:
    async with AsyncSessionLocal() as session:
        item = Item(title=body.title, owner_id=user.id)
        session.add(item)
        await session.commit()
        return item


@app.post("/items/batch", status_code=201)
def create_items(titles: list[str], session: SessionDep, user: CurrentUser) -> list[Item]:
    """All or nothing: the rows are flushed (their events written), then the quota is checked;
    a refusal rolls back the rows and their events together."""
    items = [Item(title=title, owner_id=user.id) for title in titles]
    session.add_all(items)
    session.flush()
    owned = session.exec(select(func.count()).select_from(Item)
                         .where(Item.owner_id == user.id)).one()
    if owned > MAX_ITEMS:
        raise HTTPException(409, f"at most {MAX_ITEMS} items per user")
    session.commit()
    for item in items:
        session.refresh(item)
    return items
