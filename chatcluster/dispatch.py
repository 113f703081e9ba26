"""Carrying out what the chat core decided, and feeding it the bus: the one glue between chat and I/O.

The chat core returns effects (publish this, send that to one client, send
this to the room, the client entered the room, close it); `apply` resolves
each to the client it concerns through the worker's `Registry` and hands it to
a `Sink`, which does the I/O: the worker's sink writes to sockets, a test's
sink records bytes. `feed_bus` is the other direction: the items a bus
receiver drains (batches, and the markers for a new broker, a gap, a replay,
an unreadable message) become chat core calls, in order. Both exist once, so
a test that drives the chat through them runs the code the worker runs. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from . import chat as C
from . import events as E
from .registry import Registry
from .wire import BAD, GAP, REPLAY, RESTARTED

T = TypeVar("T", contravariant=True)


class Sink(Protocol[T]):
    """Where effects and bus markers end up; T is the sink's client type."""

    def publish(self, event: E.Event) -> None: ...

    def send(self, client: T, data: bytes) -> None: ...

    def broadcast(self, data: bytes, exclude: frozenset[int]) -> None: ...

    def entered(self, client: T) -> None: ...

    def close(self, client: T, why: str) -> None: ...

    def bus_restarted(self, control: list[E.Event]) -> None: ...

    def bus_trouble(self, kind: str, text: str) -> None: ...

    def batch_done(self, publisher: str, events: list[E.Event], effects: list[C.Effect]) -> None: ...


def apply(effects: Sequence[C.Effect], registry: Registry[Any, Any], sink: Sink[Any]) -> None:
    """Carry out the chat core's effects in order; an effect for a connection gone meanwhile is dropped."""
    for e in effects:
        if isinstance(e, C.Broadcast):
            sink.broadcast(e.data, e.exclude)
        elif isinstance(e, C.Publish):
            sink.publish(e.event)
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


def feed_bus(core: C.ChatCore, items: list[tuple[str, Any]], registry: Registry[Any, Any], sink: Sink[Any]) -> None:
    """Hand what a bus receiver drained to the chat core, in order, and carry out the effects."""
    for publisher, payload in items:
        if publisher == RESTARTED:
            sink.bus_restarted(core.bus_restarted())
        elif publisher == GAP:
            sink.bus_trouble(GAP, payload)
            if core.ready:
                # Told before the lines that follow the gap, once per broker epoch.
                apply(core.messages_lost(), registry, sink)
        elif publisher == BAD:
            sink.bus_trouble(BAD, payload)
        elif publisher == REPLAY:
            apply(core.on_bus(payload[0], payload[1], replay=True), registry, sink)
        else:
            effects = core.on_bus(publisher, payload)
            apply(effects, registry, sink)
            sink.batch_done(publisher, payload, effects)
