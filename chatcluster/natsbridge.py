"""The bridge between one host and the NATS JetStream stream that all hosts share.

It moves opaque byte batches, nothing else: it never decodes a bus event.
Outbound, it publishes this host's batches to the stream one at a time,
retrying each until the stream acknowledges it, under a message id
(`Nats-Msg-Id`: node, incarnation, number) that makes a retried publish a
duplicate the stream drops; while NATS is away, batches wait in a bounded
outbox, and what cannot wait is handed back to the caller to report.
Inbound, an ordered consumer reads the stream in sequence order; every
message goes through the `hosts.HostBook` state machine, so the caller gets,
in one order identical on every host: the batches, the hosts that came and
went (a silent host's lease runs out on the stream's own clock), duplicates
removed, and gaps (stream sequences or a publisher's numbers that never
arrived) reported. The stream sequence is the global order.

`KvClaims` offers the other way of deciding claims (a KV bucket's atomic
`create()` and compare-and-set); docs/multihost.md explains why the stream
order is the recommended one.

Runs inside one asyncio loop in the process that bridges (the host's bus
process); the workers never see NATS. Needs `nats-py` (`pip install
'chatcluster[nats]'`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from . import hosts as H

log = logging.getLogger("chatcluster.natsbridge")

HDR_NODE = "Cc-Node"
HDR_INC = "Cc-Inc"
HDR_NUM = "Cc-N"
HDR_KIND = "Cc-Kind"
HDR_PARTS = "Cc-Parts"  # a message that carries several batches: how many (see _pack)
HDR_APPLIED = "Cc-Applied"  # the last stream sequence the publishing host had applied (its lag, for status)
_LEN = struct.Struct("!I")
_NAME_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")

CONNECTING, CONNECTED, DISCONNECTED, CLOSED = "connecting", "connected", "disconnected", "closed"
STALLED = "stalled"  # connected, but the stream has not acknowledged anything for stall_after seconds


JS_NOT_ENABLED_FOR_ACCOUNT = 10039  # JetStream's error code: the account has no JetStream


class NatsError(Exception):
    """A one-line, user-facing problem with NATS: the message names the cause and the fix."""


def stream_unfit(have: api.StreamConfig) -> list[str]:
    """What in an existing stream's settings (made by someone else) breaks the shared chat, each said plainly.

    Every host must read every message, in order, for as long as the history lasts:
    a stream that deletes messages once read (work queue, interest), keeps only the
    newest per host, refuses new messages when full, caps message sizes below what a
    host packs, does not acknowledge, or is sealed, would stall or silently diverge.
    """
    out: list[str] = []
    retention = getattr(have.retention, "value", have.retention)
    if retention not in (None, "limits"):
        out.append(f"retention {retention} (must be limits)")
    discard = getattr(have.discard, "value", have.discard)
    if discard not in (None, "old"):
        out.append(f"discard {discard} (must be old)")
    if have.max_msgs_per_subject not in (None, -1, 0):
        out.append(f"max_msgs_per_subject {have.max_msgs_per_subject} (must be unlimited)")
    if have.max_msg_size not in (None, -1, 0):
        out.append(f"max_msg_size {have.max_msg_size} (must be unlimited)")
    if have.no_ack:
        out.append("no_ack (publishes must be acknowledged)")
    if have.sealed:
        out.append("sealed (it takes no new messages)")
    return out


@dataclass(frozen=True)
class NatsSettings:
    servers: tuple[str, ...]
    node_name: str
    cluster: str = "main"  # names the stream (CHATCLUSTER_<cluster>) and its subjects
    replicas: int = 1  # 3 on a 3-node NATS cluster: survives the loss of one node
    max_age: float = 24 * 3600.0  # seconds a batch stays in the stream (history, late joiners)
    max_bytes: int = 1 << 30
    duplicate_window: float = 120.0  # seconds JetStream remembers message ids
    user: str | None = None
    password_file: str | None = None  # the password is read from here, never from the command line
    creds_file: str | None = None  # NATS decentralised auth (JWT + NKey seed); needs the `nkeys` package
    nkey_seed_file: str | None = None  # needs the `nkeys` package
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connect_timeout: float = 2.0  # per server, at start
    publish_timeout: float = 2.0  # one attempt; a failed attempt is retried with the same id
    heartbeat_every: float = 1.0  # a host that published nothing for this long sends a heartbeat
    lease: float = 5.0  # virtual seconds of silence after which a host is gone (HostBook)
    tick_cap: float = 1.5
    outbox_max_bytes: int = 8 << 20  # batches held while NATS is away
    outbox_max_age: float = 30.0  # a batch that waited longer than this is handed back, not sent
    consumer_heartbeat: float = 0.5  # the ordered consumer is re-created after two missed heartbeats
    ping_interval: float = 2.0  # how fast a silently dead connection is noticed
    stall_after: float = 12.0  # longer than a leader election (5-9 s): the stream lost its majority

    def __post_init__(self) -> None:
        if not self.servers:
            raise NatsError("no NATS servers given; list them with --nats-servers nats://HOST:4222,...")
        for url in self.servers:
            if not re.fullmatch(r"(nats|tls)://[^\s/]+", url):
                raise NatsError(f"NATS server URL {url!r} is not of the form nats://HOST:PORT or tls://HOST:PORT; "
                                "correct --nats-servers")
        for what, value in (("node name", self.node_name), ("cluster name", self.cluster)):
            if not _NAME_OK.fullmatch(value):
                raise NatsError(f"{what} {value!r} may only hold A-Z a-z 0-9 _ - (1 to 64 characters); "
                                f"choose another with --{what.split()[0]}-name")
        if self.replicas not in (1, 3, 5):
            raise NatsError(f"stream replicas must be 1, 3 or 5, not {self.replicas}")

    @property
    def stream(self) -> str:
        return f"CHATCLUSTER_{self.cluster}"

    @property
    def subjects(self) -> str:
        return f"chatcluster.{self.cluster}.bus.>"

    def subject(self, node: str) -> str:
        return f"chatcluster.{self.cluster}.bus.{node}"


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read().strip()
    except OSError as e:
        raise NatsError(f"cannot read the NATS {what} file {path}: {e.strerror}; check the path and its "
                        "permissions") from None
    if not value:
        raise NatsError(f"the NATS {what} file {path} is empty")
    return value


def _tls_context(s: NatsSettings) -> ssl.SSLContext | None:
    if not (s.ca_file or s.cert_file or any(u.startswith("tls://") for u in s.servers)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=s.ca_file)
        if s.cert_file:
            ctx.load_cert_chain(s.cert_file, s.key_file)
    except (OSError, ssl.SSLError) as e:
        raise NatsError(f"cannot load the NATS TLS files (ca {s.ca_file}, cert {s.cert_file}, key {s.key_file}): "
                        f"{e}; check the paths and that each file holds PEM data") from None
    return ctx


def _explain(err: BaseException | None) -> str:
    if err is None:
        return "no answer"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return f"TLS failed ({getattr(err, 'reason', None) or err})"
    if isinstance(err, nats.js.errors.APIError):
        # nats-py's str() of these is a repr with unbalanced quotes; the server's own words say it.
        if err.description and err.description != "None":
            return f"{err.description} (NATS error {err.err_code})" if err.err_code else str(err.description)
        if isinstance(err, nats.js.errors.ServiceUnavailableError):
            return "nothing answers the JetStream API"
    text = str(err).strip().strip("'\"") or type(err).__name__
    if "authorization violation" in text.lower():
        return "credentials refused (authorization violation)"
    return text


def _refusal(err: BaseException) -> str:
    """The stream's own reason when it refused a publish (a 4xx, or a limit it enforces), else ""."""
    if not isinstance(err, nats.js.errors.APIError) or not err.err_code:
        return ""  # timeouts, no responders, 503 without a code: an election or a reconnect, not a refusal
    if err.err_code == 10008:  # "JetStream system temporarily unavailable": an election
        return ""
    return _explain(err)


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch from the stream, in stream order."""
    seq: int
    ts: float
    node: str
    incarnation: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class HostHello:
    """A host's first message of an incarnation (after its HostUp), with what it said in it."""
    seq: int
    ts: float
    node: str
    incarnation: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Mark:
    """Everything of stream message `seq` has been yielded (with `read(marks=True)`): a point of the order."""
    seq: int
    ts: float


@dataclass(frozen=True, slots=True)
class Gap:
    """Stream sequences first..last were never delivered (removed by retention, or purged)."""
    first: int
    last: int


Item = Batch | HostHello | Mark | Gap | H.HostUp | H.HostGone | H.LostMessages


@dataclass
class _Pending:
    data: bytes
    kind: str
    since: float
    tokens: list[object]  # the caller's handles, given back if the batches are not sent
    expires: bool = True  # handed back after outbox_max_age; False: waits for as long as NATS is away
    parts: int = 1  # batches packed in it (see _pack)


@dataclass
class BridgeStats:
    published: int = 0
    publish_retries: int = 0
    duplicates_acked: int = 0  # the stream already had it: a retry of something that got through
    handed_back: int = 0
    delivered: int = 0
    dropped_duplicate: int = 0
    dropped_stale: int = 0
    gaps: int = 0
    consumer_resets: int = 0
    last_acked_seq: int = 0
    last_delivered_seq: int = 0
    longest_ack_wait: float = 0.0


class Bridge:
    """One host's end of the shared stream. `await Bridge(settings).start()`, then `read()` and `submit()`."""

    def __init__(self, settings: NatsSettings,
                 on_state: Callable[[str, str], None] | None = None,
                 on_handed_back: Callable[[list[object], str], None] | None = None) -> None:
        self.s = settings
        self.on_state = on_state or (lambda state, detail: None)
        self.on_handed_back = on_handed_back or (lambda tokens, why: None)
        self.state = CONNECTING
        self.incarnation = secrets.token_hex(6)
        self.number = 0  # last number used under this incarnation
        self.stats = BridgeStats()
        self.book = H.HostBook(settings.lease, settings.tick_cap)
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self._outbox: deque[_Pending] = deque()
        self._outbox_bytes = 0
        self._wake = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        self._closing = False
        self._reading = False
        self.start_seq = 0  # the stream position this bridge started reading after
        self.hello: Callable[[], bytes] = lambda: b""  # what this host says in its hello (each incarnation)
        self.applied: dict[str, int] = {}  # node -> the stream sequence it had applied, as it last said
        self.pack_max = 256 << 10  # bytes packed into one message; lowered to half the server's max_payload
        self._refused = ""  # the stream's reason for refusing the message in flight, once told

    # -- connection --------------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect to the first reachable server, or raise NatsError naming every URL tried and why."""
        s = self.s
        errors: list[str] = []  # nats-py does not say which server an error came from

        async def error_cb(e: Exception) -> None:
            if self.state == CONNECTING and _explain(e) not in errors:
                errors.append(_explain(e))
            if self.state == CONNECTED:
                log.warning("NATS: %s", _explain(e))

        async def disconnected_cb() -> None:
            if self.state == CONNECTED and not self._closing:
                self._set_state(DISCONNECTED, "lost the connection to NATS; reconnecting")

        async def reconnected_cb() -> None:
            url = self.nc.connected_url.geturl() if self.nc and self.nc.connected_url else "?"
            self._set_state(CONNECTED, f"reconnected to NATS at {url}")
            self._wake.set()

        async def closed_cb() -> None:
            if self.state != CLOSED and self.nc is not None:
                self._set_state(CLOSED, "the NATS connection is closed")

        opts: dict[str, object] = dict(
            servers=list(s.servers), name=f"chatcluster {s.node_name}", connect_timeout=s.connect_timeout,
            allow_reconnect=True, max_reconnect_attempts=1, reconnect_time_wait=0.25,
            ping_interval=s.ping_interval, max_outstanding_pings=2,
            error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
            closed_cb=closed_cb, dont_randomize=False)
        if s.user:
            opts["user"] = s.user
            opts["password"] = _read_secret(s.password_file, "password") if s.password_file else None
        if s.creds_file:
            opts["user_credentials"] = s.creds_file
        if s.nkey_seed_file:
            opts["nkeys_seed"] = s.nkey_seed_file
        tls = _tls_context(s)
        if tls is not None:
            opts["tls"] = tls
        nc = NatsClient()
        self.nc = nc
        try:
            budget = (s.connect_timeout + 0.5) * len(s.servers) * 2 + 1
            await asyncio.wait_for(nc.connect(**opts), budget)  # type: ignore[arg-type]
        except (TimeoutError, OSError, nats.errors.Error, ssl.SSLError) as e:
            self.nc = None
            await _quiet_close(nc)
            why = "; ".join(errors) or _explain(e)
            raise NatsError(f"cannot reach NATS at {', '.join(s.servers)} ({why}); start NATS there, or correct "
                            "--nats-servers and the NATS credentials") from None
        # Once connected, never give up: reconnect for as long as the bridge runs.
        nc.options["max_reconnect_attempts"] = -1
        self.js = nc.jetstream(timeout=s.publish_timeout)
        self._set_state(CONNECTED, f"connected to NATS at {nc.connected_url.geturl() if nc.connected_url else '?'}")

    def _set_state(self, state: str, detail: str) -> None:
        if state == self.state:
            return
        self.state = state
        log.info("%s", detail)
        self.on_state(state, detail)

    async def ensure_stream(self) -> api.StreamInfo:
        """Create the stream, or check that the existing one has the shape this host expects."""
        assert self.js is not None
        s = self.s
        cfg = api.StreamConfig(name=s.stream, subjects=[s.subjects], storage=api.StorageType.FILE,
                               retention=api.RetentionPolicy.LIMITS, discard=api.DiscardPolicy.OLD,
                               num_replicas=s.replicas, max_age=s.max_age, max_bytes=s.max_bytes,
                               duplicate_window=s.duplicate_window)
        deadline = time.monotonic() + 15
        while True:
            try:
                info = await self.js.stream_info(s.stream)
                break
            except nats.js.errors.NotFoundError:
                pass
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                    nats.errors.NoRespondersError) as e:
                if getattr(e, "err_code", None) == JS_NOT_ENABLED_FOR_ACCOUNT:  # waiting cannot change this
                    raise NatsError(f"JetStream is not enabled for this host's NATS account ({_explain(e)}); "
                                    "enable it for the account in the NATS server configuration "
                                    "(`jetstream: enabled` in the account's block)") from None
                if time.monotonic() > deadline:
                    raise NatsError(f"JetStream does not answer ({_explain(e)}); is JetStream enabled on the "
                                    "NATS servers and a meta leader elected?") from None
                await asyncio.sleep(0.25)
                continue
            try:
                info = await self.js.add_stream(cfg)
                break
            except nats.js.errors.BadRequestError as e:
                if e.err_code == 10058:  # created by another host meanwhile: read it back
                    continue
                raise NatsError(f"cannot create the stream {s.stream}: {e.description}") from None
            except nats.js.errors.APIError as e:
                if time.monotonic() > deadline:
                    raise NatsError(f"cannot create the stream {s.stream}: {e.description}") from None
                await asyncio.sleep(0.25)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
                # A cluster that has just started may still be placing the stream: ask again.
                if time.monotonic() > deadline:
                    raise NatsError(f"cannot create the stream {s.stream}: JetStream does not answer "
                                    f"({_explain(e)}); are enough NATS nodes up for {s.replicas} replicas?") from None
                await asyncio.sleep(0.25)
        have = info.config
        if (have.num_replicas or 1) != s.replicas or list(have.subjects or []) != [s.subjects]:
            raise NatsError(f"stream {s.stream} exists with {have.num_replicas} replicas and subjects "
                            f"{have.subjects}, this host wants {s.replicas} and {[s.subjects]}; make the hosts' "
                            "settings agree (or delete the stream)")
        unfit = stream_unfit(have)
        if unfit:
            raise NatsError(f"stream {s.stream} exists with settings chatcluster cannot work with: "
                            f"{', '.join(unfit)}; delete it (`nats stream rm {s.stream}`, the first host "
                            "that starts creates it again) or correct it")
        return info

    async def start(self) -> Bridge:
        """Connect, ensure the stream and start publishing (a hello first). Read with `read()`."""
        await self.connect()
        info = await self.ensure_stream()
        self.start_seq = info.state.last_seq
        return self.begin()

    def begin(self) -> Bridge:
        """Start publishing, a hello first (after `connect` and `ensure_stream`)."""
        if self.nc is not None and self.nc.max_payload:
            self.pack_max = max(1024, min(self.pack_max, self.nc.max_payload // 2))
        self._enqueue(self.hello(), "hello", None)
        self._publisher = asyncio.create_task(self._publish_loop(), name="natsbridge-publisher")
        return self

    async def close(self, say_bye: bool = True) -> None:
        """Say bye (others free this host's users at once), stop publishing, close the connection."""
        if say_bye and self.state == CONNECTED and self._publisher is not None:
            self._enqueue(b"", "bye", None, expires=False)
            deadline = time.monotonic() + 2
            while self._outbox and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self._closing = True
        if self._publisher is not None:
            # Bounded: on Python 3.11 a cancel that races a completing wait_for inside nats-py can be
            # lost; the loop then ends by itself at its next turn, since it checks _closing.
            self._publisher.cancel()
            await asyncio.wait({self._publisher}, timeout=3)
        self._set_state(CLOSED, "closed the NATS connection")
        if self.nc is not None:
            await _quiet_close(self.nc)
        self._hand_back_all("the bridge was closed")

    # -- outbound ----------------------------------------------------------------------------
    def submit(self, batch: bytes, token: object = None, expires: bool = True) -> bool:
        """Queue a batch for the stream. False: the outbox is full; the caller tells the senders.

        `expires=False` is for the few small batches that must reach the stream however long NATS
        is away (a host's claims and departures): they are neither refused nor handed back.
        """
        if self._closing:
            return False
        if expires and self._outbox_bytes + len(batch) > self.s.outbox_max_bytes:
            return False
        self._enqueue(batch, "batch", token, expires)
        return True

    @property
    def pending(self) -> int:
        return len(self._outbox)

    def _enqueue(self, data: bytes, kind: str, token: object, expires: bool = False) -> None:
        self._outbox.append(_Pending(data, kind, time.monotonic(), [token], expires))
        self._outbox_bytes += len(data)
        self._wake.set()

    def _pop(self) -> None:
        p = self._outbox.popleft()
        self._outbox_bytes -= len(p.data)

    def _hand_back_all(self, why: str) -> None:
        tokens = []
        while self._outbox:
            p = self._outbox[0]
            self._pop()
            if p.kind == "batch":
                tokens.extend(p.tokens)
        if tokens:
            self.stats.handed_back += len(tokens)
            self.on_handed_back(tokens, why)

    def _expire_waiting(self) -> None:
        """Batches that waited longer than outbox_max_age (NATS away) go back to the caller, unsent."""
        now = time.monotonic()
        old = []
        # The head may be in flight (it may have reached the stream): it is never handed back.
        keep = deque([self._outbox.popleft()]) if self._outbox else deque()
        while self._outbox:
            p = self._outbox.popleft()
            if p.kind == "batch" and p.expires and now - p.since > self.s.outbox_max_age:
                old.append(p)
                self._outbox_bytes -= len(p.data)
            else:
                keep.append(p)
        self._outbox = keep
        if old:
            self.stats.handed_back += len(old)
            self.on_handed_back([t for p in old for t in p.tokens], "NATS was unreachable for too long")

    async def _publish_loop(self) -> None:
        """One message in flight at a time: a host's messages reach the stream in its own order.

        Pipelining could let message n+1 be stored while n is retried, and the
        receivers' per-publisher numbering would then drop n as late. One in
        flight costs one round trip per message; the caller's batches grow
        meanwhile, so throughput holds while latency gains at most one round trip.
        """
        assert self.js is not None
        s = self.s
        while not self._closing:
            if not self._outbox:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), s.heartbeat_every)
                except TimeoutError:
                    self._enqueue(b"", "heartbeat", None)
                continue
            p = self._pack()
            incarnation = self.incarnation
            number = self.number + 1
            headers = {"Nats-Msg-Id": f"{s.node_name}.{incarnation}.{number}", HDR_NODE: s.node_name,
                       HDR_INC: incarnation, HDR_NUM: str(number), HDR_KIND: p.kind,
                       HDR_APPLIED: str(self.stats.last_delivered_seq)}
            if p.parts > 1:
                headers[HDR_PARTS] = str(p.parts)
            started = time.monotonic()
            delay = 0.02
            while not self._closing:
                if incarnation != self.incarnation:  # this host was declared gone meanwhile
                    break
                try:
                    ack = await self.js.publish(s.subject(s.node_name), p.data, timeout=s.publish_timeout,
                                                headers=headers)
                except nats.errors.MaxPayloadError:
                    log.error("a batch of %d bytes is larger than the NATS max_payload; not sent", len(p.data))
                    self._pop()
                    self.stats.handed_back += 1
                    self.on_handed_back(p.tokens, "the batch is larger than NATS accepts")
                    break
                except (TimeoutError, nats.errors.Error, OSError) as e:
                    # Timeouts, no responders (an election), a reconnect in progress, 503s: the same id again.
                    self.stats.publish_retries += 1
                    refused = _refusal(e)
                    if refused and refused != self._refused:
                        # The stream itself says no (its settings were changed under the hosts): no election
                        # ends that, so the operator must hear the server's reason, once per reason.
                        log.error("the stream %s refuses this host's messages: %s; check its settings "
                                  "(`nats stream info %s`); retrying", s.stream, refused, s.stream)
                    self._refused = refused or self._refused
                    log.debug("publish attempt failed (%s); retrying", _explain(e))
                    self._expire_waiting()
                    if self.state == CONNECTED and time.monotonic() - started > s.stall_after:
                        why = await self._stall_reason()
                        if self._closing or incarnation != self.incarnation:
                            break
                        self._set_state(STALLED, f"NATS has acknowledged nothing for {s.stall_after:.0f} s "
                                                 f"({why})")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.25)
                    continue
                if incarnation != self.incarnation:  # handed back while in flight: the outbox is new
                    break
                self.number = number
                self._refused = ""
                self._pop()
                if self.state == STALLED:
                    self._set_state(CONNECTED, "NATS acknowledges again")
                self.stats.published += 1
                self.stats.duplicates_acked += bool(ack.duplicate)
                self.stats.last_acked_seq = max(self.stats.last_acked_seq, ack.seq)
                self.stats.longest_ack_wait = max(self.stats.longest_ack_wait, time.monotonic() - started)
                break

    async def _stall_reason(self) -> str:
        """Why nothing is acknowledged, as far as NATS can say: the stream's refusal, or the stream gone."""
        if self._refused:
            return f"the stream refuses its messages: {self._refused}"
        assert self.js is not None
        try:
            await self.js.stream_info(self.s.stream)
        except nats.js.errors.NotFoundError:
            # Deleted under the running hosts (`nats stream rm`): no election brings it back, and a
            # stream made afresh would number from 1 again, behind what every host has read.
            log.error("the stream %s does not exist any more (deleted from NATS while the hosts ran); stop "
                      "every host, then start them again: the first one creates it anew", self.s.stream)
            return f"the stream {self.s.stream} was deleted; restart every host"
        except (TimeoutError, nats.errors.Error, OSError):
            pass
        return "has the stream lost its majority?"

    def _pack(self) -> _Pending:
        """The next message: the head of the outbox, with the batches waiting behind it packed in.

        While one message is in flight the caller's batches queue up; sending them together
        as one message (each prefixed with its length, the count in a header) keeps a busy
        host at one round trip per message without falling behind. Packed once, before the
        first attempt, so that a retry sends exactly the same message under the same id.
        """
        head = self._outbox[0]
        if head.kind != "batch" or head.parts > 1 or len(self._outbox) < 2:
            return head
        taken = [head]
        size = len(head.data) + _LEN.size
        for p in list(self._outbox)[1:]:
            if p.kind != "batch" or size + len(p.data) + _LEN.size > self.pack_max:
                break
            taken.append(p)
            size += len(p.data) + _LEN.size
        if len(taken) == 1:
            return head
        for _ in taken:
            self._outbox.popleft()
        data = b"".join(_LEN.pack(len(p.data)) + p.data for p in taken)
        packed = _Pending(data, "batch", head.since, [t for p in taken for t in p.tokens],
                          all(p.expires for p in taken), len(taken))
        self._outbox.appendleft(packed)
        self._outbox_bytes += len(data) - sum(len(p.data) for p in taken)
        return packed

    # -- inbound -----------------------------------------------------------------------------
    async def read(self, after: int | None = None, marks: bool = False) -> AsyncIterator[Item]:
        """Everything in the stream after sequence `after` (default: where `start()` began), in order.

        Yields batches, host arrivals and departures, and gaps. A departure of
        this very host (its lease ran out while it was cut off) switches it to a
        new incarnation: it starts fresh and says hello again; the caller must
        re-claim its users, since everyone else has let them go. With `marks`, a
        `Mark` follows the items of every stream message (heartbeats included):
        the points at which the caller's state is that of the stream up to there.
        """
        assert self.js is not None
        if self._reading:
            raise RuntimeError("a bridge has one reader: the host book must see every message once")
        self._reading = True
        s = self.s
        last = self.start_seq if after is None else after
        delay = 0.1
        while True:
            # During a leader election creating the consumer times out: try again until it exists.
            # Once it exists, nats-py re-creates it by itself whenever its heartbeats stop.
            try:
                sub = await self.js.subscribe(
                    s.subjects, stream=s.stream, ordered_consumer=True, idle_heartbeat=s.consumer_heartbeat,
                    deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                    config=api.ConsumerConfig(opt_start_seq=last + 1))
                break
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError,
                    nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as e:
                if self._closing:
                    return
                log.info("cannot create the stream consumer yet (%s); retrying", _explain(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    if self._closing:
                        return
                    continue
                except nats.errors.ConnectionClosedError:
                    return
                md = msg.metadata
                seq = md.sequence.stream
                if seq <= last:  # re-delivered after the consumer was re-created
                    continue
                if seq > last + 1:
                    self.stats.gaps += 1
                    yield Gap(last + 1, seq - 1)
                last = seq
                self.stats.last_delivered_seq = seq
                ts = md.timestamp.timestamp()
                for item in self._apply(msg, seq, ts):
                    yield item
                if marks:
                    yield Mark(seq, ts)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # closing anyway: the connection may be gone
                pass

    def _apply(self, msg: Msg, seq: int, ts: float) -> list[Item]:
        hdr = msg.headers or {}
        try:
            stamp = H.Stamp(seq, ts, hdr[HDR_NODE], hdr[HDR_INC], int(hdr[HDR_NUM]), hdr[HDR_KIND])
        except (KeyError, ValueError):
            log.warning("stream message %d has no valid chatcluster headers; ignored", seq)
            return []
        applied = hdr.get(HDR_APPLIED)
        if applied and applied.isdigit():
            self.applied[stamp.node] = int(applied)
        out: list[Item] = []
        for o in self.book.apply(stamp):
            if isinstance(o, H.Deliver):
                if o.stamp.kind == "batch":
                    parts = unpack(msg.data, hdr)
                    self.stats.delivered += len(parts)
                    out.extend(Batch(seq, ts, stamp.node, stamp.incarnation, data, dict(hdr)) for data in parts)
                elif o.stamp.kind == "hello":
                    out.append(HostHello(seq, ts, stamp.node, stamp.incarnation, msg.data))
            elif isinstance(o, H.Dropped):
                if o.reason == "duplicate":
                    self.stats.dropped_duplicate += 1
                else:
                    self.stats.dropped_stale += 1
            else:
                if (isinstance(o, H.HostGone) and o.node == self.s.node_name and o.incarnation == self.incarnation
                        and o.reason == "lease"):
                    self._start_fresh()
                # (Gone as "restarted" while we run: another process publishes under our node name.
                # Starting afresh would only start a tug of war; the caller is told and decides.)
                out.append(o)
        return out

    def _start_fresh(self) -> None:
        """Everyone has let this host go: what it held is void; come back as a new incarnation."""
        log.warning("this host was declared gone by the stream (cut off too long); rejoining afresh")
        self.incarnation = secrets.token_hex(6)
        self.number = 0
        self._hand_back_all("this host was cut off from NATS too long and rejoined")
        self._enqueue(self.hello(), "hello", None)

    async def stream_last_seq(self) -> int:
        """The stream's last sequence now (for lag: last - stats.last_delivered_seq)."""
        return (await self.stream_bounds())[1]

    async def stream_bounds(self) -> tuple[int, int]:
        """(first, last) sequence the stream holds now; (0, 0) or (n + 1, n) when it holds nothing."""
        assert self.js is not None
        state = (await self.js.stream_info(self.s.stream)).state
        return state.first_seq, state.last_seq

    async def scan(self, first: int, last: int) -> AsyncIterator[Batch]:
        """The batches stored at sequences first..last, in order, outside the host book.

        For a host that starts from a snapshot and wants the lines said before it (history):
        nothing here is decided again, so the book, which has seen these messages already
        (it comes from the same snapshot), must not see them twice.
        """
        assert self.js is not None
        if last < first:
            return
        sub = await self.js.subscribe(
            self.s.subjects, stream=self.s.stream, ordered_consumer=True, idle_heartbeat=self.s.consumer_heartbeat,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, config=api.ConsumerConfig(opt_start_seq=first))
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5.0)
                except nats.errors.TimeoutError:
                    return  # nothing more stored (the range ended in messages removed meanwhile)
                md = msg.metadata
                seq = md.sequence.stream
                if seq > last:
                    return
                hdr = msg.headers or {}
                if hdr.get(HDR_KIND) != "batch":
                    continue
                ts = md.timestamp.timestamp()
                for data in unpack(msg.data, hdr):
                    yield Batch(seq, ts, hdr.get(HDR_NODE, ""), hdr.get(HDR_INC, ""), data, dict(hdr))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may be gone
                pass


async def probe(settings: NatsSettings) -> None:
    """Connect, make sure of the stream, disconnect, saying nothing: NatsError (one line) if any of it fails."""
    bridge = Bridge(settings)
    level = log.level
    log.setLevel(logging.WARNING)  # the connection's coming and going is no news here
    try:
        await bridge.connect()
        await bridge.ensure_stream()
    finally:
        bridge._closing = True
        if bridge.nc is not None:
            await _quiet_close(bridge.nc)
        log.setLevel(level)


def quiet_asyncio() -> None:
    """asyncio warns on stderr about every TLS connection a server refuses ("returning true from
    eof_received() has no effect when using ssl"); the bridge says what happened, once."""
    logging.getLogger("asyncio").setLevel(logging.ERROR)


def unpack(data: bytes, headers: dict[str, str]) -> list[bytes]:
    """The batches of one stream message: one, or those packed in it (see Bridge._pack)."""
    n = headers.get(HDR_PARTS)
    if not n:
        return [data]
    out: list[bytes] = []
    at = 0
    for _ in range(int(n)):
        (size,) = _LEN.unpack_from(data, at)
        at += _LEN.size
        out.append(data[at:at + size])
        at += size
    return out


async def _quiet_close(nc: NatsClient) -> None:
    try:
        await asyncio.wait_for(nc.close(), 3)
    except (TimeoutError, nats.errors.Error, OSError):
        pass


class KvClaims:
    """Atomic claims in a KV bucket: `create()` has one winner, updates and deletes compare revisions.

    Decides a claim at once but outside the chat's order; see docs/multihost.md.
    Keys: A-Z a-z 0-9 and - _ = . / (the caller maps nicknames and rooms onto them).
    """

    def __init__(self, kv: object) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bridge: Bridge, bucket: str, replicas: int | None = None) -> KvClaims:
        assert bridge.js is not None
        try:
            kv = await bridge.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await bridge.js.create_key_value(api.KeyValueConfig(
                bucket=bucket, history=1, replicas=replicas or bridge.s.replicas,
                storage=api.StorageType.FILE, max_bytes=64 << 20))
        return cls(kv)

    async def claim(self, key: str, owner: bytes) -> int | None:
        """The claim's revision if this caller won the key, None if someone holds it."""
        try:
            return await self.kv.create(key, owner)  # type: ignore[attr-defined,no-any-return]
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        try:
            return await self.kv.update(key, value, last=revision)  # type: ignore[attr-defined,no-any-return]
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def release(self, key: str, revision: int) -> bool:
        """Delete the claim if it is still at `revision` (nobody took it over meanwhile)."""
        try:
            await self.kv.delete(key, last=revision)  # type: ignore[attr-defined]
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            return False
        return True

    async def owner(self, key: str) -> tuple[bytes, int] | None:
        try:
            e = await self.kv.get(key)  # type: ignore[attr-defined]
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return e.value, e.revision


class SnapshotStore:
    """The newest snapshot of the hosts' shared state, in a KV bucket, for a host that starts later.

    A snapshot is opaque bytes tagged with the stream sequence it is the state after. It is
    cut into parts below the server's max_payload and written under the writer's own keys
    (`<node>.<slot>.<i>`, two slots used in turn, so that keys are overwritten rather than
    piling up), then the `head` key is switched to it with compare-and-set: only a snapshot
    of a later sequence replaces the head. A reader takes the head, then its parts, and checks
    them against the digest in the head (a writer may be overwriting a slot it reads).
    """

    HEAD = "head"

    def __init__(self, kv: Any, node: str, part_size: int) -> None:
        self.kv = kv
        self.node = node
        self.part_size = part_size
        self.slot = 0
        self.written = 0  # the sequence of the last snapshot this host wrote

    @classmethod
    async def open(cls, bridge: Bridge) -> SnapshotStore:
        assert bridge.js is not None and bridge.nc is not None
        s = bridge.s
        bucket = f"{s.stream}_snap"
        deadline = time.monotonic() + 15
        while True:
            try:
                try:
                    kv = await bridge.js.key_value(bucket)
                except nats.js.errors.BucketNotFoundError:
                    try:
                        kv = await bridge.js.create_key_value(api.KeyValueConfig(
                            bucket=bucket, history=1, replicas=s.replicas, storage=api.StorageType.FILE,
                            max_bytes=256 << 20))
                    except nats.js.errors.BadRequestError:
                        kv = await bridge.js.key_value(bucket)  # made by another host meanwhile
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as e:
                if time.monotonic() > deadline:
                    raise NatsError(f"cannot open the KV bucket {bucket} for snapshots: JetStream does not answer "
                                    f"({_explain(e)})") from None
                await asyncio.sleep(0.25)
        part = max(4096, min(512 << 10, (bridge.nc.max_payload or (1 << 20)) - 8192))
        return cls(kv, s.node_name, part)

    async def read(self, tries: int = 5) -> tuple[int, bytes] | None:
        """(sequence, snapshot) of the newest snapshot, or None when there is none."""
        import hashlib
        import json

        for _ in range(tries):
            try:
                head = json.loads((await self.kv.get(self.HEAD)).value)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.5)  # an election: ask again
                continue
            chunks = []
            try:
                for key in head["parts"]:
                    chunks.append((await self.kv.get(key)).value)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.errors.TimeoutError,
                    nats.errors.NoRespondersError):
                await asyncio.sleep(0.2)
                continue
            data = b"".join(chunks)
            if hashlib.sha256(data).hexdigest() == head["sha256"]:
                return int(head["seq"]), data
            await asyncio.sleep(0.2)  # overwritten while we read it: the head has moved on
        log.warning("the newest snapshot in %s could not be read consistently", self.HEAD)
        return None

    async def write(self, seq: int, data: bytes) -> bool:
        """Store the snapshot after stream sequence `seq`; False if a newer one is there already."""
        import hashlib
        import json

        self.slot ^= 1
        keys = []
        for i in range(0, max(1, len(data)), self.part_size):
            key = f"{self.node}.{self.slot}.{i // self.part_size}"
            await self.kv.put(key, data[i:i + self.part_size])
            keys.append(key)
        head = json.dumps({"seq": seq, "parts": keys, "sha256": hashlib.sha256(data).hexdigest(),
                           "by": self.node}).encode()
        for _ in range(5):
            try:
                entry = await self.kv.get(self.HEAD)
                if int(json.loads(entry.value)["seq"]) >= seq:
                    return False
                await self.kv.update(self.HEAD, head, last=entry.revision)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                try:
                    await self.kv.create(self.HEAD, head)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another host switched the head meanwhile: look again
            self.written = seq
            return True
        return False


def run_forever(main: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Run a bridge coroutine; a NatsError becomes one line on stderr and exit status 1."""
    try:
        asyncio.run(main())
    except NatsError as e:
        os.write(2, f"chatcluster: {e}\n".encode())
        raise SystemExit(1) from None
