"""Carrying out what the chat core decided, and feeding it the bus: the one glue between chat and I/O.

The chat core returns effects (publish this on that route, send that to one
client, send this to the members of some rooms, the client entered or moved
between rooms, close it); `apply` resolves each to the clients it concerns
through the worker's `Registry` and hands it to a `Sink`, which does the I/O:
the worker's sink writes to sockets, a test's sink records bytes. `feed_bus`
is the other direction: the items a bus receiver drains (batches, and the
markers for a new broker, a gap, an unreadable message) become chat core
calls, in order, after each batch's place in its publisher's numbering of its
route is checked (`wire.OrderTracker.place`) against the core's membership at
that very point. Both exist once, so a test that drives the chat through them
runs the code the worker runs. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

from . import chat as C
from . import events as E
from .registry import Registry
from .wire import BAD, GAP, REPLAY, RESTARTED, Batch, OrderTracker

T = TypeVar("T")


class Sink(Protocol[T]):
    """Where effects and bus markers end up; T is the sink's client type."""

    def publish(self, event: E.Event, route: str) -> None: ...

    def send(self, client: T, data: bytes) -> None: ...

    def broadcast(self, b: C.Broadcast, recipients: Iterable[tuple[int, T]]) -> None: ...

    def entered(self, client: T) -> None: ...

    def close(self, client: T, why: str) -> None: ...

    def bus_restarted(self, control: list[E.Event]) -> None: ...

    def bus_trouble(self, kind: str, text: str) -> None: ...

    def batch_done(self, publisher: str, events: list[E.Event], effects: list[C.Effect]) -> None: ...


def apply(effects: Sequence[C.Effect], registry: Registry[Any, Any], sink: Sink[Any]) -> None:
    """Carry out the chat core's effects in order; an effect for a connection gone meanwhile is dropped."""
    for e in effects:
        if isinstance(e, C.Broadcast):
            sink.broadcast(e, registry.recipients(e.rooms, e.part) if e.rooms != C.ANYWHERE else registry.room())
        elif isinstance(e, C.Publish):
            sink.publish(e.event, e.route)
        elif isinstance(e, C.Place):
            registry.place(e.conn, e.rooms, e.active)
        else:
            client = registry.by_conn(e.conn)
            if client is None:
                continue
            if isinstance(e, C.Send):
                sink.send(client, e.data)
            elif isinstance(e, C.Enter):
                registry.enter(client)
                sink.entered(client)
            else:
                sink.close(client, e.why)


def feed_bus(core: C.ChatCore, items: list[tuple[str, Any]], registry: Registry[Any, Any], sink: Sink[Any],
             order: OrderTracker | None = None) -> None:
    """Hand what a bus receiver drained to the chat core, in order, and carry out the effects."""
    for publisher, payload in items:
        if publisher == RESTARTED:
            sink.bus_restarted(core.bus_restarted())
        elif publisher == GAP:
            lost(core, registry, sink, payload)
        elif publisher == BAD:
            sink.bus_trouble(BAD, payload)
        else:
            batch: Batch = payload
            if order is not None and batch.pseq:
                where = order.place(publisher, batch.route, batch.pseq, core.route_gen(batch.route))
                if where == REPLAY:
                    apply(core.on_bus(publisher, batch.events, True, batch.route), registry, sink)
                    continue
                if where is not None:
                    lost(core, registry, sink, where)
            effects = core.on_bus(publisher, batch.events, False, batch.route)
            apply(effects, registry, sink)
            if not batch.route:
                for ev in batch.events:
                    kind = type(ev)
                    if kind is E.StreamGap:  # the shared stream lost messages (a multi-host cluster)
                        lost(core, registry, sink, ev.text, again=True)
                    elif order is None:
                        continue
                    elif kind is E.Seed:  # we receive this room's traffic from here on
                        order.baseline(ev.room, core.route_gen(ev.room), ev.seqs)
                    elif kind is E.Lost:  # a dead worker publishes nothing more
                        order.forget_publisher(ev.worker)
                    elif kind is E.Undelivered and ev.worker == order.worker_id:
                        order.forget_unacked(ev.batches)  # never to be resent: their senders were told
            sink.batch_done(publisher, batch.events, effects)


def lost(core: C.ChatCore, registry: Registry[Any, Any], sink: Sink[Any], text: str, again: bool = False) -> None:
    sink.bus_trouble(GAP, text)
    if core.ready:
        # Told before the lines that follow the gap, once per broker epoch (or each time: `again`).
        apply(core.messages_lost(again), registry, sink)
