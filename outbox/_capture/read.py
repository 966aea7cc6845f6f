"""Read events (``"read"`` in ``operations``): not transactional, handed to the default broker.

After the ORM loads an instance of a captured model in a session whose registration asks for
reads, a ``schema.entity.read`` event with the loaded columns goes to
``outbox.get_default_broker().submit`` (synchronous, non-blocking, thread-safe). The registry's
``load`` listener finds the registration and calls :func:`emit_read`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.state import InstanceState

from outbox._capture.scope import Scope
from outbox.events import EventSource, Operation, new_event

__all__ = ["emit_read"]


def emit_read(scope: Scope, state: InstanceState[Any], session: Session) -> None:
    """Submit the read event of the instance ``state`` just loaded by ``session``."""
    plan = scope.plan(state.mapper)
    if plan is None:
        return
    # Imported here, not at the top: ``import outbox`` does not load the broker, and only
    # applications that opt into read events need it.
    from outbox.broker import get_default_broker

    bind = session.get_bind(mapper=state.mapper)
    schema, types = plan.types(bind.dialect.default_schema_name)
    dict_ = state.dict
    # Only what the query loaded: a read event never issues SQL of its own.
    loaded = {key: dict_[key] for key, _ in plan.cols if key in dict_}
    payload = {name: value for name, value in plan.stored(loaded, bind.dialect).items()
               if name in {plan.names[k] for k in loaded}}
    entity_id = plan.entity_id(payload)
    event = new_event(
        source=EventSource.DATABASE,
        type=types[Operation.READ],
        payload=payload,
        schema_name=schema,
        entity=plan.entity,
        entity_id=entity_id,
        operation=Operation.READ,
        ordering_key=f"{schema}.{plan.entity}:{entity_id}",
    )
    # Raises QueueFull / BrokerNotStarted: opting into read events without a running broker
    # (or with a saturated one) is an error the reader must see, not a silent drop.
    get_default_broker().submit(event)
