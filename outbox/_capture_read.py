"""Read events (``"read"`` in ``operations``): not transactional, handed to the default broker.

After the ORM loads an instance of a captured model in a session whose registration asks for
reads, a ``schema.entity.read`` event with the loaded columns goes to
``outbox.get_default_broker().submit`` (synchronous, non-blocking, thread-safe).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm.attributes import instance_state

from outbox._capture_plan import jsonable

__all__ = ["on_load"]


def on_load(target: Any, context: Any) -> None:
    """Mapper ``load`` listener."""
    from outbox.capture import registration_for

    state = instance_state(target)
    session = state.session or getattr(context, "session", None)
    if session is None:
        return
    reg = registration_for(session)
    if reg is None or not reg.read:
        return
    plan = reg.plan(state.mapper)
    if plan is None:
        return
    from outbox.broker import get_default_broker
    from outbox.events import new_event

    bind = session.get_bind(mapper=state.mapper)
    schema, types = plan.types(bind.dialect.default_schema_name)
    dict_ = state.dict
    # Only what the query loaded: a read event never issues SQL of its own.
    payload = {name: jsonable(plan.model, name, dict_[key]) for key, name in plan.cols
               if key in dict_}
    entity_id = plan.entity_id([dict_.get(k) for k in plan.pk_keys])
    event = new_event(
        source="database",
        type=types[3],
        payload=payload,
        schema_name=schema,
        entity=plan.entity,
        entity_id=entity_id,
        operation="read",
        ordering_key=f"{schema}.{plan.entity}:{entity_id}",
    )
    # Raises QueueFull / BrokerNotStarted: opting into read events without a running broker
    # (or with a saturated one) is an error the reader must see, not a silent drop.
    get_default_broker().submit(event)

