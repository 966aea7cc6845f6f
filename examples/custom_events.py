"""Publishing custom events through the in-process broker.

    python examples/custom_events.py

Runs on the memory provider, no database, no server. Shows publish_sync / publish_async /
submit, retries, the failed status with its error, an event nobody handles, and stop().
(Events that must never be lost go into the events table instead:
``session.add(outbox.new_event(...))`` commits them with your transaction; the relay delivers
them to the same handlers.)
"""

from __future__ import annotations

import logging
import threading

import anyio

import outbox


async def main() -> None:
    broker = outbox.Broker(
        mode="async",
        worker_count=4,
        retry_policy=outbox.RetryPolicy(max_retries=2, initial_delay=0.05, max_delay=0.2),
    )

    @broker.subscribe("chat.message")
    async def deliver(event: outbox.Event) -> None:
        print(f"  deliver   {event.payload['msg']!r} to room {event.payload['room']}")

    attempts = 0

    @broker.subscribe("billing.charge")
    def charge(event: outbox.Event) -> None:  # sync: runs in a worker thread
        nonlocal attempts
        attempts += 1
        if event.payload["amount"] > 100:
            raise ValueError("card declined")
        print(f"  charged   {event.payload['amount']} (attempt {attempts})")

    async with broker:  # start() ... stop()
        # A WebSocket message, with who sent it (outbox.context fills user/session ids).
        with outbox.context(user_id=42, session_id="ws-7"):
            message = outbox.new_event(outbox.EventSource.WEBSOCKET, "chat.message",
                                       {"room": "lobby", "msg": "Hello"})
        print("publish_sync: returns once every handler ran")
        await broker.publish_sync(message)
        print(f"  status={message.status} user_id={message.user_id}")

        print("publish_sync of an event whose handler keeps failing (2 retries):")
        declined = outbox.new_event("system", "billing.charge", {"amount": 250})
        try:
            await broker.publish_sync(declined)
        except outbox.exceptions.HandlerError as exc:
            print(f"  HandlerError after {attempts} attempts: {exc.errors}")
        stored = await broker.provider.get(declined.id)
        assert stored is not None
        print(f"  stored status={stored.status} error={stored.error!r}")

        print("publish_async: queued for the workers, returns at once")
        for amount in (10, 20):
            await broker.publish_async(outbox.new_event("system", "billing.charge",
                                                        {"amount": amount}))
        await broker.join()

        print("submit: from code that cannot await, in any thread")
        worker = threading.Thread(target=broker.submit, args=(
            outbox.new_event("frontend", "chat.message", {"room": "ops", "msg": "from a thread"}),
        ))
        worker.start()
        await anyio.to_thread.run_sync(worker.join)
        await broker.join()

        orphan = outbox.new_event("system", "nobody.listens", {})
        await broker.publish_async(orphan)
        print(f"an event without handler: status={orphan.status} metadata={orphan.meta}")

        stats = await broker.stats()
        print(f"stats: published={stats.total_published} processed={stats.total_processed} "
              f"failed={stats.total_failed} queue={stats.queue_size}")
    # Leaving the block stopped the broker: it drained its queue; publishing now is an error.
    try:
        await broker.publish_async(outbox.new_event("system", "chat.message", {}))
    except outbox.exceptions.BrokerClosed as exc:
        print(f"after stop: BrokerClosed: {exc}")


if __name__ == "__main__":
    # Failed handler attempts are logged (warning, then error with the traceback); keep the demo
    # output short.
    logging.getLogger("outbox.broker").setLevel(logging.CRITICAL)
    anyio.run(main)
