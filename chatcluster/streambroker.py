"""The bus process's decisions in a multi-host cluster: the directory applied in the order of the shared stream.

Every host's bus process applies every batch of the shared stream (the
batches of every host's workers, in stream order) to its own copy of the
directory, as the one-host broker applies its workers' batches in bus order:
the same rules fed the same batches in the same order reach the same state
and the same verdicts on every host, so a claim, a join or a limit is decided
once for all hosts, at one point of the chat, without a host asking another.
Each host then delivers to its *own* workers what the one-host broker would
have delivered to them (a room's batch to those with members in the room, a
verdict to the workers it is for), stamped with this host's epoch and each
worker's own dense sequence, so the workers run unchanged.

What the local workers publish is not decided here on arrival: it goes to the
stream (`submit`) and is decided when it comes back from it, in its place.
Hosts come and go in the stream's order too (`hosts.HostBook`, in the bridge):
a host gone has its users removed at one point of the order on every host; a
host that says hello anew names the workers that live on. A host that starts
later loads the state after some stream sequence (`state`, `load`: what the
snapshots in the KV bucket hold) and applies the stream from there.

Everything that decides uses only what is in the stream (the stream's
timestamps, never a local clock or a random choice). Pure apart from `emit`
(to the local workers) and `submit` (to the stream); it imports neither NATS
nor asyncio. `Broker` supplies the routing, the directory and the history;
this class changes where batches come from and who is local.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import events as E
from .broker import MAX_ROUTES, NUDGE_EVERY, Broker, BrokerSettings
from .directory import BROKER, Decided
from .rooms import Room
from .wire import FLAG_ROSTER, UNREADABLE_PAYLOAD, WIRE_VERSION, decode, decode_batch, encode, node_of, peek

log = logging.getLogger("chatcluster.streambroker")

# What every host of one conversation must run alike: the directory's rules and this module's reading
# of the stream. A host whose hello or snapshot says another version refuses to join.
RULES = 1
PART_BITS = 16  # a history chunk's serial is (stream sequence << PART_BITS) + its place in the message
HISTORY_REPLAY_MAX = 50_000  # stream messages a starting host reads back at most for the rooms' history


Submit = Callable[[bytes, object, bool], bool]  # (payload, token, expires) -> accepted


class StreamBroker(Broker):
    """The directory, applied in stream order; delivery to this host's workers only.

    `emit(header, payload)` publishes one stamped message to a local worker, as the broker's
    does; `submit(payload, token, expires)` queues a batch for the stream (False: refused).
    """

    def __init__(self, emit: Callable[[bytes, bytes], None], submit: Submit, node: str,
                 workers: Sequence[str] = (), settings: BrokerSettings | None = None) -> None:
        super().__init__(emit, workers, 0.0, settings)
        self.expected.clear()  # no resync phase: the directory lives on in the stream, not in this process
        self.phase_ends = 0.0
        self.node = node
        self.name = f"{BROKER}@{node}"  # the publisher of this host's own control batches (a worker gone)
        self.suffix = "@" + node
        self.submit = submit
        self.listening: set[str] = set()  # local workers whose Hello came back from the stream: we deliver to them
        self._local: dict[frozenset[str], frozenset[str]] = {}  # a room's audience -> its listening local workers
        # Replicated state (the same on every host at the same sequence; in the snapshots):
        self.seen: dict[str, set[str]] = {}  # node -> the publishers of it seen in the stream
        self.applied = 0  # the last stream sequence applied
        self.stream_ts = 0.0  # its timestamp
        self.last_snapshot_ts = 0.0  # the stream time of the last point at which a snapshot was due
        # node -> (worker, conn) of its users let go when it was cut off: the other hosts told their
        # users they left, so when the host is back and its workers resync, they are told they joined.
        self.let_go: dict[str, set[tuple[str, int]]] = {}
        # This host's counters.
        self.undelivered = 0  # local batches that never reached the stream (their senders were told)
        self.foreign = 0  # batches of workers a host may not speak for, dropped

    # -- who is local -----------------------------------------------------------------------------

    def is_local(self, worker: str) -> bool:
        return worker.endswith(self.suffix)

    def everyone(self) -> set[str]:
        return self.listening

    def listen(self, worker: str) -> None:
        self.listening.add(worker)
        self._local.clear()

    def unlisten(self, worker: str) -> None:
        self.listening.discard(worker)
        self._local.clear()

    def local_audience(self, route: str) -> frozenset[str]:
        aud = self.directory.audience(route)
        got = self._local.get(aud)
        if got is None:
            if len(self._local) > 4096:
                self._local.clear()
            got = self._local[aud] = frozenset(w for w in aud if w in self.listening)
        return got

    def seeded(self, d: E.Seed, targets: frozenset[str] | None) -> E.Seed:
        if targets is not None and not any(self.is_local(w) for w in targets):
            return d  # for another host's worker: that host fills it from its own history
        return super().seeded(d, targets)

    # -- from the local workers: to the stream ----------------------------------------------------

    def receive(self, payload: bytes, now: float) -> None:
        """A batch from one of this host's workers: it goes to the stream, to be decided when it comes back."""
        head = self.head_of(payload, now)
        if head is None:
            return
        publisher = head.publisher
        if not self.is_local(publisher):
            self.foreign += 1
            self.complain(now, "dropped a batch of %s, which is no worker of this host (%s)", publisher, self.node)
            return
        if head.pseq == 0:
            self.admitted.add(publisher)
            self.known.add(publisher)
            if head.flags & FLAG_ROSTER:
                payload = self.without_history(payload)
            self.submit(payload, payload, False)
            return
        if publisher not in self.admitted:
            self.nudge(now)  # dropped: the worker sends it again after its RESYNC
            return
        # A room's lines may wait only so long for the stream (their senders are then told);
        # requests (claims, departures) wait for as long as NATS is away.
        if not self.submit(payload, payload, bool(head.route)):
            self.handed_back([payload])

    def without_history(self, payload: bytes) -> bytes:
        """A worker's resync without its copies of the rooms' history: that comes from the stream here."""
        try:
            publisher, pseq, events = decode(payload)
        except UNREADABLE_PAYLOAD:
            return payload
        if not any(type(ev) is E.HistoryCopy for ev in events):
            return payload
        return encode(publisher, pseq, [ev for ev in events if type(ev) is not E.HistoryCopy])

    def gone(self, worker: str, now: float) -> None:
        """The supervisor reaped a local worker: its departure goes in the stream, so that every host
        removes its users at the same point."""
        self.dead.add(worker)
        self.admitted.discard(worker)
        self.known.discard(worker)
        self.unlisten(worker)
        self.submit(encode(self.name, 0, [E.Gone(worker)]), None, False)

    def handed_back(self, tokens: Iterable[object]) -> None:
        """Batches that never reached the stream: each worker forgets them and tells the senders.

        Only a room's lines are reported: requests and resyncs are handed back only when this
        host rejoins the stream as a new incarnation, and then every worker resyncs and sends
        again whatever it has not seen come back.
        """
        by_worker: dict[str, tuple[list[tuple[str, int]], list[int]]] = {}
        for token in tokens:
            if not isinstance(token, bytes):
                continue
            try:
                batch = decode_batch(token)
            except UNREADABLE_PAYLOAD:
                continue
            if not batch.route or not batch.pseq or batch.publisher in self.dead:
                continue
            numbers, conns = by_worker.setdefault(batch.publisher, ([], []))
            numbers.append((batch.route, batch.pseq))
            conns.extend(ev.conn for ev in batch.events if isinstance(ev, E.Chat | E.Me))
            self.undelivered += 1
        for worker, (numbers, conns) in by_worker.items():
            if worker in self.listening or worker in self.admitted:
                self.send_to((worker,), encode(self.name, 0, [E.Undelivered(worker, numbers, sorted(set(conns)))]))

    # -- from the stream, in its order ------------------------------------------------------------

    def apply(self, node: str, seq: int, ts: float, payload: bytes, now: float, part: int = 0) -> None:
        """One worker batch of host `node`, stored at stream sequence `seq` (the `part`-th in its message)."""
        self.applied, self.stream_ts = seq, ts
        try:
            head = peek(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.complain(now, "dropped an unreadable batch from host %s: %s", node, exc)
            return
        publisher = head.publisher
        if node_of(publisher) != node:
            self.foreign += 1
            self.complain(now, "dropped a batch of %s from host %s, which may only speak for its own workers",
                          publisher, node)
            return
        seen = self.seen.get(node)
        if seen is None:
            seen = self.seen[node] = set()
        if publisher not in seen:
            seen.add(publisher)
        if not head.flags & FLAG_ROSTER:
            route = head.route
            if route:
                seqs = self.route_seqs.get(route)
                if seqs is None:
                    seqs = self.route_seqs[route] = {}
                    if len(self.route_seqs) > MAX_ROUTES:
                        self.forget_routes()
                fresh = head.pseq > seqs.get(publisher, 0)
                targets = self.local_audience(route)
                if publisher in self.listening and publisher not in targets:
                    targets = targets | {publisher}
                if targets:
                    self.send_to(targets, payload)
                if fresh:  # (not a batch sent again after a restart of its host's bus process)
                    seqs[publisher] = head.pseq
                    if self.history.max_lines > 0:
                        self.history.add(route, ts, head.nevents, payload, (seq << PART_BITS) + part)
            elif self.listening:
                self.send_to(self.listening, payload)
            return
        try:
            publisher, _, events = decode(payload)
        except UNREADABLE_PAYLOAD as exc:
            self.complain(now, "dropped an unreadable batch of %s: %s", publisher, exc)
            return
        mine = self.is_local(publisher) and publisher not in self.dead
        if mine and any(type(ev) is E.Hello for ev in events):
            self.listen(publisher)  # its place in the order starts here, with its snapshot after this batch
        decided = self.decide(publisher, events, now)
        if self.let_go.get(node):
            decided = self.welcome_back(node, publisher, events, decided)
        self.deliver(publisher, head.pseq, decided)
        for ev in events:
            if isinstance(ev, E.Hello) and mine:
                self.snapshot(publisher, ev.nonce)
            elif isinstance(ev, E.Gone):
                self.forget_worker(str(ev.worker))

    def welcome_back(self, node: str, publisher: str, events: list[E.Event], decided: Decided) -> Decided:
        """Users of a host that was cut off and is back: on the other hosts, where they were seen to
        leave, they join again (after a resync, or under a fresh name if theirs was taken meanwhile);
        on their own host, where nobody saw them go, nothing changes (or they are renamed)."""
        gone = self.let_go[node]
        out: Decided = []
        for ev, targets in decided:
            if type(ev) is E.Rejoined and (publisher, ev.conn) in gone:
                gone.discard((publisher, ev.conn))
                home = frozenset(w for w in (targets or ()) if node_of(w) == node) if targets is not None else None
                out.append((ev, home if home is not None else frozenset(self.listening)))
                out += self.joined_again(node, publisher, ev.conn, ev.nick)
            else:
                out.append((ev, targets))
        if any(type(ev) is E.Resync for ev in events):
            for m in self.roster.members_of(publisher):
                if (publisher, m.conn) in gone:
                    gone.discard((publisher, m.conn))
                    out += self.joined_again(node, publisher, m.conn, m.nick)
        if not gone:
            del self.let_go[node]
        return out

    def joined_again(self, node: str, worker: str, conn: int, nick: str) -> Decided:
        """`nick` joins each of its rooms, for the workers of every host but its own."""
        others = frozenset(w for w in self.listening if node_of(w) != node)
        rooms = self.directory.rooms
        out: Decided = []
        for key in rooms.rooms_of(worker, conn):
            if key == rooms.default:
                out.append((E.Joined(conn, nick, ""), others))
            else:
                out.append((E.RoomJoined(conn, nick, rooms.name_of(key)), others))
        return out

    def forget_worker(self, worker: str) -> None:
        """A worker is gone from the directory: forget its numbering (its name may come back with its host)."""
        for seqs in self.route_seqs.values():
            seqs.pop(worker, None)
        self.seen.get(node_of(worker), set()).discard(worker)
        if self.is_local(worker):
            self.unlisten(worker)
            self.wseq.pop(worker, None)
            self.topics.pop(worker, None)

    def workers_of(self, node: str) -> list[str]:
        """Every worker of `node` the directory or the stream knows."""
        suffix = "@" + node
        names = set(self.seen.get(node, ()))
        names.update(w for w in self.roster.shards if w.endswith(suffix))
        for room in self.directory.rooms.rooms.values():
            names.update(w for w in room.by_worker if w.endswith(suffix))
        names.discard(f"{BROKER}@{node}")
        return sorted(names)

    def host_gone(self, node: str, reason: str, now: float) -> None:
        """The host book let an incarnation of `node` go at this point of the order."""
        if reason == "restarted":
            return  # its hello, next in this same message, says which of its workers live on
        if node == self.node:
            if reason == "stopped":
                return  # our own bye: we are closing
            # Cut off longer than the lease: every other host has let our users go, here and now in
            # the order. So do we (without telling our own clients, who are still here); then our
            # workers resync, as after a restart of this process, and claim their names again.
            log.warning("this host was cut off from the stream longer than the lease; its users are claimed anew")
            self.reset_host(node, (), deliver=False, let_go=True)
            self.new_epoch(now)
            return
        self.reset_host(node, (), deliver=True, let_go=True)

    def host_hello(self, node: str, data: bytes, now: float) -> None:
        """A new incarnation of `node` said hello, naming its workers that live on: the others are gone."""
        try:
            info = json.loads(data) if data else {}
        except ValueError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        problem = self.disagreement(info)
        if problem:
            log.error("host %s %s", node, problem)
        keep = {str(w) for w in info.get("workers", ()) if isinstance(w, str)}
        gone = self.let_go.get(node)
        if gone is not None:  # those of its users let go that may yet come back: on the workers it still has
            self.let_go[node] = {(w, c) for w, c in gone if w in keep}
            if not self.let_go[node]:
                del self.let_go[node]
        self.reset_host(node, keep, deliver=True)

    def disagreement(self, info: dict[str, Any]) -> str | None:
        """What in a hello or a snapshot shows rules other than ours, or None."""
        if info.get("rules", RULES) != RULES or info.get("wire", WIRE_VERSION) != WIRE_VERSION:
            return (f"runs other rules (stream rules {info.get('rules')}, bus wire {info.get('wire')}; here "
                    f"{RULES} and {WIRE_VERSION}); run the same chatcluster version on every host")
        room = info.get("default_room", self.settings.default_room)
        if room != self.settings.default_room:
            return (f"has default_room {room!r}, this host {self.settings.default_room!r}; every host must "
                    f"have the same default_room")
        return None

    def hello(self, workers: Iterable[str]) -> bytes:
        """What this host says in its hello: its live workers, and the rules it runs."""
        return json.dumps({"workers": sorted(workers), "rules": RULES, "wire": WIRE_VERSION,
                           "default_room": self.settings.default_room}).encode()

    def reset_host(self, node: str, keep: Iterable[str], deliver: bool, let_go: bool = False) -> None:
        """Every worker of `node` but `keep` is gone: its users leave, at this point, on every host.

        `let_go`: the host was silent too long, not known dead; its users are remembered, so that
        they can be told joining again if the host comes back.
        """
        kept = set(keep)
        workers = [w for w in self.workers_of(node) if w not in kept]
        if not workers:
            return
        decided: list[E.Event] = []
        if let_go:
            # Its workers may yet be alive: the receivers keep their numbering (a Quit for each user,
            # not a Lost, which would make them forget it), so that if the host comes back and goes
            # on numbering, what it said meanwhile and never delivered shows as a gap.
            gone = {(w, m.conn) for w in workers for m in self.roster.members_of(w)}
            if gone:
                self.let_go[node] = gone
            for w in workers:
                members = {m.nick: m.conn for m in self.roster.members_of(w)}
                for ev, _ in self.directory.decide(self.name, E.Gone(w)):
                    if type(ev) is E.Lost:
                        decided += [E.Quit(members.get(nick, 0), nick, "connection lost", keys)
                                    for nick, keys in ev.members]
        else:
            for w in workers:
                decided += [ev for ev, _ in self.directory.decide(self.name, E.Gone(w))]
                self.forget_worker(w)
        if deliver and self.listening and decided:
            self.send_to(self.listening, encode(f"{BROKER}@{node}", 0, decided))

    def new_epoch(self, now: float) -> None:
        """Our workers are to resync (as with a new broker): they re-announce their users and resend."""
        self.epoch = random.getrandbits(63) or 1
        self.admitted.clear()
        self.wseq.clear()
        self.known |= self.listening
        self.last_nudge = -NUDGE_EVERY
        self.nudge(now)

    def tell(self, ev: E.Event) -> None:
        """A word from this host's bus process for every listening worker (a gap, the link's state)."""
        if self.listening:
            self.send_to(self.listening, encode(self.name, 0, [ev]))

    # -- snapshots ----------------------------------------------------------------------------------

    def snapshot_due(self, ts: float, every: float) -> bool:
        """Whether a snapshot is due at this point of the order (every host agrees: stream time only)."""
        if ts - self.last_snapshot_ts < every:
            return False
        self.last_snapshot_ts = ts
        return True

    def state(self, book: dict[str, Any]) -> dict[str, Any]:
        """The replicated state after `self.applied`, as plain data (`load` makes it again)."""
        rooms = self.directory.rooms
        return {
            "rules": RULES, "wire": WIRE_VERSION, "default_room": self.settings.default_room,
            "seq": self.applied, "ts": self.stream_ts, "last_snapshot_ts": self.last_snapshot_ts,
            "members": [list(t) for t in self.roster.snapshot()],
            "rooms": [[r.key, r.name, [[w, sorted(conns)] for w, conns in r.by_worker.items()]]
                      for r in rooms.rooms.values()],
            "extra": [[w, c, list(keys)] for (w, c), keys in rooms.extra.items()],
            "aliases": dict(self.directory.aliases),
            "route_seqs": {route: dict(seqs) for route, seqs in self.route_seqs.items()}, "forgot": self.forgot,
            "seen": {node: sorted(ws) for node, ws in self.seen.items()},
            "let_go": {node: sorted([w, c] for w, c in pairs) for node, pairs in self.let_go.items()},
            "history_from": self.history.oldest() >> PART_BITS,
            "book": book,
        }

    def load(self, st: dict[str, Any]) -> None:
        """Take the state of a snapshot (ValueError, with the reason, if this host cannot join it)."""
        problem = self.disagreement(st)
        if problem:
            raise ValueError(f"the newest snapshot of the shared state {problem}")
        self.roster.load(st["members"])
        rooms = self.directory.rooms
        rooms.rooms = {}
        rooms.memberships = 0
        for key, name, by_worker in st["rooms"]:
            room = rooms.rooms[key] = Room(key, name)
            for w, conns in by_worker:
                room.by_worker[w] = set(conns)
                room.size += len(conns)
            rooms.memberships += room.size
        if rooms.default not in rooms.rooms:
            rooms.rooms[rooms.default] = Room(rooms.default, rooms.default_name)
        rooms.extra = {(w, int(c)): list(keys) for w, c, keys in st["extra"]}
        self.directory.aliases = dict(st["aliases"])
        self.route_seqs = {route: {p: int(n) for p, n in seqs.items()} for route, seqs in st["route_seqs"].items()}
        self.forgot = bool(st["forgot"])
        self.seen = {node: set(ws) for node, ws in st["seen"].items()}
        self.let_go = {node: {(str(w), int(c)) for w, c in pairs} for node, pairs in st.get("let_go", {}).items()}
        self.applied, self.stream_ts = int(st["seq"]), float(st["ts"])
        self.last_snapshot_ts = float(st["last_snapshot_ts"])

    def replay_history(self, seq: int, ts: float, payload: bytes, part: int) -> None:
        """A room batch said before the snapshot this host started from: for the rooms' history only."""
        try:
            head = peek(payload)
        except UNREADABLE_PAYLOAD:
            return
        if head.route and not head.flags & FLAG_ROSTER and self.history.max_lines > 0:
            self.history.add(head.route, ts, head.nevents, payload, (seq << PART_BITS) + part)

    def counters(self) -> dict[str, int]:
        out = super().counters()
        out.update(undelivered=self.undelivered, foreign=self.foreign, applied=self.applied,
                   listening=len(self.listening))
        return out

