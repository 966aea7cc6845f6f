"""Unit tests share one process: a test must leave process-wide state as it found it.

The guard below fails the test that changed it (the default broker and its handler registry,
broker observers, the root logger's handlers and level, the instance id, the OpenTelemetry tracer
provider, the Prometheus default registry), so a leak is fixed where it is made instead of
showing up as an order-dependent failure somewhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest


def _process_state() -> dict[str, Any]:
    from prometheus_client import REGISTRY

    import outbox.broker.core as core
    import outbox.broker.default as default
    from outbox.events import get_instance_id

    root = logging.getLogger()
    state: dict[str, Any] = {
        "default broker": id(default._default) if default._default is not None else None,
        "subscribe registry": sorted(default._registry),
        "broker observers": list(map(id, core._global_observers)),
        "root logger": (root.level, list(map(id, root.handlers))),
        "outbox logger": (logging.getLogger("outbox").level,
                          list(map(id, logging.getLogger("outbox").handlers))),
        "instance id": get_instance_id(),
        "prometheus registry": sorted(REGISTRY._names_to_collectors),
    }
    try:
        from opentelemetry import trace
    except ImportError:
        pass
    else:
        state["tracer provider"] = id(trace._TRACER_PROVIDER)
    return state


@pytest.fixture(autouse=True)
def _leaves_process_state_alone(request: pytest.FixtureRequest) -> Iterator[None]:
    before = _process_state()
    yield
    after = _process_state()
    changed = sorted(key for key in before if before[key] != after[key])
    if changed:
        pytest.fail(f"{request.node.nodeid} left process-wide state changed: "
                    f"{', '.join(changed)} (restore it where the test sets it)", pytrace=False)
