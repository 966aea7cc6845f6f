"""The provider conformance suite: every provider passes the same behavioural tests.

Adding a provider takes a few lines here:

1. Write a fixture named ``conformance_<name>`` that returns a *factory*: a zero-argument callable
   returning an async context manager that yields a provider (and closes it on exit). Every
   provider one factory makes must share one backend namespace (the same stream, key prefix or
   database), so the suite can check persistence and cross-instance delivery with two of them;
   use the per-test fixtures of ``tests/conftest.py`` (``redis_url`` + ``redis_prefix``,
   ``nats_url`` + ``nats_names``, ``pg_url``/``engine``) so each test gets a namespace of its own,
   cleaned up afterwards. Example::

       @pytest.fixture
       def conformance_redis(redis_url: str, redis_prefix: str) -> ProviderFactory:
           from outbox.providers.redis import RedisProvider

           @contextlib.asynccontextmanager
           async def make() -> AsyncIterator[Provider]:
               provider = RedisProvider(redis_url, stream_name=f"{redis_prefix}:events")
               try:
                   yield provider
               finally:
                   await provider.close()

           return make

2. Add ``"<name>"`` to :data:`PROVIDERS`.

The provider's ``capabilities`` (``outbox.providers.base.Capabilities``) decide which tests
apply: ``full_query`` for the ``list`` filters, ``persistent`` for the restart test,
``cross_instance`` for delivery between two instances. Run one provider with
``pytest tests/conformance -k memory``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import pytest

from outbox.providers.base import Provider
from outbox.providers.memory import MemoryProvider

ProviderFactory: TypeAlias = Callable[[], AbstractAsyncContextManager[Provider]]

#: Providers the suite runs against: each needs a ``conformance_<name>`` fixture.
PROVIDERS = ["memory", "redis", "nats", "database"]


@pytest.fixture
def conformance_memory() -> ProviderFactory:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Provider]:
        provider = MemoryProvider()
        try:
            yield provider
        finally:
            await provider.close()

    return make


@pytest.fixture
def conformance_redis(redis_url: str, redis_prefix: str) -> ProviderFactory:
    from outbox.providers.redis import RedisProvider

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Provider]:
        provider = RedisProvider(redis_url, stream_name=f"{redis_prefix}:events", block=0.2)
        try:
            yield provider
        finally:
            await provider.close()

    return make


@pytest.fixture
def conformance_nats(nats_url: str, nats_names: Any) -> ProviderFactory:
    from outbox.providers.nats import NATSProvider

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Provider]:
        provider = NATSProvider(nats_url, stream_name=nats_names.stream,
                                subject_prefix=nats_names.subject_prefix, block=0.2)
        try:
            yield provider
        finally:
            await provider.close()

    return make


@pytest.fixture
def conformance_database(pg_engine: Any) -> ProviderFactory:
    from outbox.providers.database import DatabaseProvider

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Provider]:
        provider = DatabaseProvider(pg_engine)
        try:
            yield provider
        finally:
            await provider.close()

    return make


@pytest.fixture(params=PROVIDERS)
def provider_factory(request: pytest.FixtureRequest) -> ProviderFactory:
    """The factory of one provider under test (parametrised over :data:`PROVIDERS`)."""
    factory: ProviderFactory = request.getfixturevalue(f"conformance_{request.param}")
    return factory


@pytest.fixture
async def provider(provider_factory: ProviderFactory) -> AsyncIterator[Provider]:
    """One open provider of the kind under test."""
    async with provider_factory() as p:
        yield p
