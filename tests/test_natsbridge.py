"""The NATS bridge against real nats-server clusters: order, deduplication, failover, liveness, TLS, claims."""

from __future__ import annotations

import asyncio
import json
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("nats", reason="nats-py is not installed (pip install 'chatcluster[nats]')")

from conftest import _stop_with_parent  # noqa: E402
from nats_support import NatsCluster, clusters_for, nats_server_binary  # noqa: E402
from netns_support import Netns, TestLan, netns_available  # noqa: E402

from chatcluster import hosts as H  # noqa: E402
from chatcluster import natsbridge as NB  # noqa: E402

_binary, _why = nats_server_binary()
pytestmark = pytest.mark.skipif(_binary is None, reason=_why)

HOST_SCRIPT = str(Path(__file__).with_name("nats_host.py"))
STREAM = "CHATCLUSTER_main"


@pytest.fixture
def make_nats(request: pytest.FixtureRequest) -> Iterator[Callable[..., NatsCluster]]:
    yield from clusters_for(request, 1)


async def acknowledged(br: NB.Bridge, timeout: float = 30.0) -> None:
    """Until the stream has acknowledged every batch `br` was given (none waiting or in flight)."""
    deadline = time.monotonic() + timeout
    while br.pending:
        assert time.monotonic() < deadline, f"{br.pending} batches not acknowledged in {timeout:.0f} s"
        await asyncio.sleep(0.01)


def run(coro: Awaitable[Any], timeout: float = 60.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def settings(cluster: NatsCluster, node: str, **kw: Any) -> NB.NatsSettings:
    return NB.NatsSettings(tuple(cluster.urls), node, **kw)


class Reader:
    """Collects everything a bridge reads, in order, in a task of the test's loop."""

    def __init__(self, bridge: NB.Bridge, after: int | None = 0) -> None:
        self.items: list[NB.Item] = []
        self.times: list[float] = []
        self.task = asyncio.create_task(self._run(bridge, after))

    async def _run(self, bridge: NB.Bridge, after: int | None) -> None:
        async for item in bridge.read(after):
            self.items.append(item)
            self.times.append(time.monotonic())

    def batches(self) -> list[NB.Batch]:
        return [i for i in self.items if isinstance(i, NB.Batch)]

    def of(self, kind: type) -> list[Any]:
        return [i for i in self.items if isinstance(i, kind)]

    async def until(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"reader ended before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; "
                                     f"last items {self.items[-5:]}")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.task.cancel()


def assert_exactly_once_in_order(batches: list[NB.Batch], sent: dict[str, list[str]]) -> None:
    got = [b.data.decode() for b in batches]
    assert len(got) == len(set(got)), f"duplicates delivered: {len(got) - len(set(got))}"
    assert sorted(got) == sorted(x for xs in sent.values() for x in xs), "lost or unknown batches"
    for node, xs in sent.items():
        assert [g for g in got if g.startswith(node + ":")] == xs, f"{node}'s batches out of its order"
    seqs = [b.seq for b in batches]
    assert seqs == sorted(seqs)


# -- order and deduplication -----------------------------------------------------------------

def test_two_bridges_read_every_batch_once_in_one_order(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        b = await NB.Bridge(settings(c, "b")).start()
        ra, rb = Reader(a), Reader(b)
        sent: dict[str, list[str]] = {"a": [], "b": []}
        for i in range(60):
            for node, br in (("a", a), ("b", b)):
                sent[node].append(f"{node}:{i}")
                assert br.submit(f"{node}:{i}".encode())
            if i % 7 == 0:
                await asyncio.sleep(0.003)
        for r in (ra, rb):
            await r.until(lambda r=r: len(r.batches()) == 120, 30, "all 120 batches")
        assert_exactly_once_in_order(ra.batches(), sent)
        assert [(x.seq, x.data) for x in ra.batches()] == [(x.seq, x.data) for x in rb.batches()]
        assert [type(x) for x in ra.items] == [type(x) for x in rb.items]
        assert {u.node for u in ra.of(H.HostUp)} == {"a", "b"}
        for r in (ra, rb):
            r.stop()
        await a.close()
        await b.close()

    run(scenario())


def test_a_retried_publish_is_stored_once(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        assert a.js is not None
        # A publisher "g" whose first attempt got through but whose ack was lost tries again.
        hdr = {"Nats-Msg-Id": "g.x.1", NB.HDR_NODE: "g", NB.HDR_INC: "x", NB.HDR_NUM: "1", NB.HDR_KIND: "batch"}
        first = await a.js.publish("chatcluster.main.bus.g", b"once", headers=dict(hdr))
        again = await a.js.publish("chatcluster.main.bus.g", b"once", headers=dict(hdr))
        assert (again.seq, again.duplicate) == (first.seq, True) and not first.duplicate
        # Past the dedup window the stream would store it again: the host book still drops it.
        late = dict(hdr, **{"Nats-Msg-Id": "g.x.1-late"})
        stored = await a.js.publish("chatcluster.main.bus.g", b"once", headers=late)
        assert stored.seq > first.seq
        r = Reader(a, after=first.seq - 1)
        await r.until(lambda: a.stats.last_delivered_seq >= stored.seq, 10, "the late copy")
        assert [x.data for x in r.batches()] == [b"once"]
        assert a.stats.dropped_duplicate == 1
        r.stop()
        await a.close()

    run(scenario())


def test_a_gap_in_the_stream_is_reported(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        for i in range(5):  # one message each: batches waiting together would be packed into one
            a.submit(f"a:{i}".encode())
            await acknowledged(a)
        assert a.js is not None
        last = a.stats.last_acked_seq
        await a.js.delete_msg(STREAM, last - 2)  # as retention or an operator would
        await a.js.delete_msg(STREAM, last - 1)
        r = Reader(a, after=0)
        await r.until(lambda: a.stats.last_delivered_seq >= last, 10, "the stream's end")
        assert r.of(NB.Gap) == [NB.Gap(last - 2, last - 1)]
        assert r.of(H.LostMessages), "the publisher's missing numbers are reported too"
        r.stop()
        await a.close()

    run(scenario())


# -- failures --------------------------------------------------------------------------------

def publish_through_kill(c: NatsCluster, victim: Callable[[], Any], stop: str = "kill") -> dict[str, float]:
    """Two bridges publish 200 batches each at ~100/s; `victim()` names the node to kill a third of the way in."""
    async def scenario() -> dict[str, float]:
        a = await NB.Bridge(settings(c, "a", replicas=3)).start()
        b = await NB.Bridge(settings(c, "b", replicas=3)).start()
        ra, rb = Reader(a), Reader(b)
        sent: dict[str, list[str]] = {"a": [], "b": []}
        killed_at = 0.0
        for i in range(200):
            if i == 70:
                node = victim()
                killed_at = time.monotonic()
                node.kill() if stop == "kill" else node.stop()
            for name, br in (("a", a), ("b", b)):
                sent[name].append(f"{name}:{i}")
                assert br.submit(f"{name}:{i}".encode())
            await asyncio.sleep(0.01)
        for r in (ra, rb):
            await r.until(lambda r=r: len(r.batches()) >= 400, 60, "all 400 batches after the kill")
        # A last batch from each: published after every retry above was acknowledged, so a
        # duplicate of any of them would be stored before it.
        for name, br in (("a", a), ("b", b)):
            sent[name].append(f"{name}:end")
            assert br.submit(f"{name}:end".encode())
        for r in (ra, rb):
            await r.until(lambda r=r: {x.data for x in r.batches()} >= {b"a:end", b"b:end"}, 60, "the last batches")
        assert_exactly_once_in_order(ra.batches(), sent)
        assert [(x.seq, x.data) for x in ra.batches()] == [(x.seq, x.data) for x in rb.batches()]
        # The stall: the longest pause in deliveries after the kill.
        after = [killed_at] + [t for t in ra.times if t >= killed_at]
        stall = max((y - x for x, y in zip(after, after[1:], strict=False)), default=0.0)
        gone = [g for g in ra.of(H.HostGone) if g.node in ("a", "b")]
        assert not gone, f"a publisher was declared gone during the failover: {gone}"
        for r in (ra, rb):
            r.stop()
        await a.close()
        await b.close()
        return {"stall": stall, "retries": a.stats.publish_retries + b.stats.publish_retries,
                "ack_wait": max(a.stats.longest_ack_wait, b.stats.longest_ack_wait)}

    return run(scenario(), 120)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_kill9_of_the_stream_leader_loses_and_duplicates_nothing(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(3)
    result = publish_through_kill(c, lambda: c.stream_leader(STREAM))
    sys.stderr.write(f"\nstream leader kill -9: delivery stall {result['stall']:.2f} s, longest wait for an "
                     f"ack {result['ack_wait']:.2f} s, {result['retries']} publish retries\n")


@pytest.mark.slow
def test_a_killed_and_restarted_node_catches_up(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(3)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a", replicas=3)).start()
        leader = c.stream_leader(STREAM)
        follower = next(n for n in c.nodes if n is not leader)
        follower.kill()
        for i in range(50):
            a.submit(f"a:{i}".encode())
        await acknowledged(a)
        c.restart(follower)
        # Now lose the other two in turn: the restarted node must have caught up to serve the stream.
        other = next(n for n in c.nodes if n is not leader and n is not follower)
        other.kill()
        await asyncio.sleep(0.5)
        c.restart(other)
        c.stream_leader(STREAM)
        leader.kill()
        fresh = await NB.Bridge(settings(c, "reader", replicas=3)).start()
        r = Reader(fresh, after=0)
        await r.until(lambda: len(r.batches()) >= 50, 40, "the 50 batches from the surviving nodes")
        assert [x.data.decode() for x in r.batches()] == [f"a:{i}" for i in range(50)]
        r.stop()
        await fresh.close(say_bye=False)
        await a.close(say_bye=False)

    run(scenario(), 120)


def test_unreachable_at_start_is_one_line_naming_the_url() -> None:
    from conftest import free_port
    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(NB.NatsError) as e:
        run(NB.Bridge(NB.NatsSettings((url,), "a", connect_timeout=1.0)).start(), 30)
    assert url in str(e.value) and "connection refused" in str(e.value) and "\n" not in str(e.value)
    # And as a program: one line on stderr, exit status 1.
    code = ("import asyncio,sys; sys.path.insert(0,'.'); from chatcluster import natsbridge as NB\n"
            f"NB.run_forever(lambda: NB.Bridge(NB.NatsSettings(({url!r},), 'a')).start())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and url in p.stderr, p.stderr


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(NB.NatsError, match="nats://HOST:PORT"):
        NB.NatsSettings(("127.0.0.1:4222",), "a")
    with pytest.raises(NB.NatsError, match="node name 'a b'"):
        NB.NatsSettings(("nats://127.0.0.1:4222",), "a b")
    with pytest.raises(NB.NatsError, match="cannot read the NATS password file /nonexistent"):
        run(NB.Bridge(NB.NatsSettings(("nats://127.0.0.1:1",), "a", user="u",
                                      password_file="/nonexistent")).connect())


@pytest.mark.slow
def test_nats_without_jetstream_is_one_clean_line(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1, jetstream=False)
    with pytest.raises(NB.NatsError) as e:
        run(NB.Bridge(settings(c, "a")).start(), 40)
    text = str(e.value)
    assert "JetStream does not answer (nothing answers the JetStream API)" in text, text
    assert "is JetStream enabled on the NATS servers" in text and "None" not in text, text


def test_an_account_without_jetstream_is_refused_without_waiting(
        make_nats: Callable[..., NatsCluster], tmp_path: Path) -> None:
    # JetStream on the server, but not for the account the host logs in to: no wait can change that,
    # so it is said at once (well within the 15 s given to a cluster still electing its leader).
    c = make_nats(1, extra="accounts { A { users: [ { user: u, password: p } ] } }")
    (tmp_path / "pw").write_text("p")
    with pytest.raises(NB.NatsError) as e:
        run(NB.Bridge(settings(c, "a", user="u", password_file=str(tmp_path / "pw"))).start(), 10)
    text = str(e.value)
    assert "JetStream is not enabled for this host's NATS account" in text, text
    assert "JetStream not enabled for account (NATS error 10039)" in text and "\n" not in text, text


@pytest.mark.parametrize("made, said", [
    ({"max_msg_size": 64}, "max_msg_size 64 (must be unlimited)"),
    ({"retention": "workqueue"}, "retention workqueue (must be limits)"),
    ({"max_msgs_per_subject": 1}, "max_msgs_per_subject 1 (must be unlimited)"),
    ({"discard": "new", "max_msgs": 1000}, "discard new (must be old)"),
])
def test_a_stream_made_by_someone_else_with_unfit_settings_is_one_line_naming_them(
        make_nats: Callable[..., NatsCluster], made: dict[str, Any], said: str) -> None:
    c = make_nats(1)
    s = settings(c, "a")

    async def scenario() -> None:
        other = NB.Bridge(s)
        await other.connect()
        assert other.js is not None
        await other.js.add_stream(NB.api.StreamConfig(name=s.stream, subjects=[s.subjects], **made))
        await other.close(say_bye=False)
        await NB.Bridge(s).start()

    with pytest.raises(NB.NatsError) as e:
        run(scenario(), 30)
    text = str(e.value)
    assert said in text and f"nats stream rm {s.stream}" in text and "\n" not in text, text


@pytest.mark.slow
def test_a_stream_changed_under_a_running_host_to_refuse_its_messages_is_said_with_the_servers_reason(
        make_nats: Callable[..., NatsCluster], caplog: pytest.LogCaptureFixture) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        details: list[str] = []
        a = await NB.Bridge(settings(c, "a", stall_after=2.0), on_state=lambda st, d: details.append(d)).start()
        r = Reader(a)
        a.submit(b"a:before")
        await r.until(lambda: len(r.batches()) == 1, 10, "the first batch")
        assert a.js is not None
        info = await a.js.stream_info(STREAM)
        info.config.max_msg_size = 64
        await a.js.update_stream(info.config)
        a.submit(b"a:" + b"x" * 200)
        await r.until(lambda: a.state == NB.STALLED, 20, "the stalled state")
        info.config.max_msg_size = -1
        await a.js.update_stream(info.config)
        await r.until(lambda: len(r.batches()) == 2, 20, "the held batch once the stream takes it")
        r.stop()
        await a.close()
        assert any("the stream refuses its messages: message size exceeds maximum allowed" in d
                   for d in details), details

    with caplog.at_level("ERROR", logger="chatcluster.natsbridge"):
        run(scenario(), 60)
    refusals = [r.getMessage() for r in caplog.records if "refuses this host's messages" in r.getMessage()]
    assert len(refusals) == 1, refusals  # once, not once per retry
    assert "message size exceeds maximum allowed (NATS error 10054)" in refusals[0], refusals


@pytest.mark.slow
def test_a_stream_deleted_under_a_running_host_is_said_as_such_not_as_a_lost_majority(
        make_nats: Callable[..., NatsCluster], caplog: pytest.LogCaptureFixture) -> None:
    c = make_nats(1)

    async def scenario() -> list[str]:
        details: list[str] = []
        a = await NB.Bridge(settings(c, "a", stall_after=2.0), on_state=lambda st, d: details.append(d)).start()
        r = Reader(a)
        a.submit(b"a:before")
        await r.until(lambda: len(r.batches()) == 1, 10, "the first batch")
        assert a.js is not None
        await a.js.delete_stream(STREAM)
        a.submit(b"a:after")
        await r.until(lambda: a.state == NB.STALLED, 20, "the stalled state")
        r.stop()
        await a.close()
        return details

    with caplog.at_level("ERROR", logger="chatcluster.natsbridge"):
        details = run(scenario(), 60)
    assert any(f"the stream {STREAM} was deleted; restart every host" in d for d in details), details
    assert any(f"the stream {STREAM} does not exist any more" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_lost_connection_is_told_once_and_held_batches_arrive_after(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        states: list[str] = []
        a = await NB.Bridge(settings(c, "a"), on_state=lambda s, d: states.append(s)).start()
        r = Reader(a)
        a.submit(b"a:before")
        await r.until(lambda: len(r.batches()) == 1, 10, "the first batch")
        c.nodes[0].kill()
        await r.until(lambda: a.state == NB.DISCONNECTED, 15, "the bridge to notice")
        for i in range(20):
            assert a.submit(f"a:held{i}".encode())
        await asyncio.sleep(0.5)
        c.nodes[0].start()
        c.wait_ready()
        await r.until(lambda: len(r.batches()) == 21, 30, "the held batches")
        assert [x.data.decode() for x in r.batches()] == ["a:before"] + [f"a:held{i}" for i in range(20)]
        assert states == [NB.CONNECTED, NB.DISCONNECTED, NB.CONNECTED]
        r.stop()
        await a.close()

    run(scenario(), 90)


@pytest.mark.slow
def test_a_stream_without_its_majority_is_reported_stalled_until_it_is_back(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(3)

    async def scenario() -> None:
        states: list[str] = []
        a = await NB.Bridge(settings(c, "a", replicas=3, stall_after=2.0),
                            on_state=lambda s, d: states.append(s)).start()
        r = Reader(a)
        a.submit(b"a:before")
        await r.until(lambda: len(r.batches()) == 1, 10, "the first batch")
        # Kill the two nodes the bridge is not connected to: it stays connected, but nothing is acknowledged.
        assert a.nc is not None and a.nc.connected_url is not None
        port = a.nc.connected_url.port
        others = [n for n in c.nodes if n.client_port != port]
        for n in others:
            n.kill()
        a.submit(b"a:during")
        await r.until(lambda: a.state == NB.STALLED, 20, "the stalled state")
        for n in others:
            n.start()
        await r.until(lambda: len(r.batches()) == 2, 60, "the held batch after the majority is back")
        await r.until(lambda: a.state == NB.CONNECTED, 10, "the acknowledgement")  # may come after the delivery
        assert [x.data for x in r.batches()] == [b"a:before", b"a:during"]
        assert states == [NB.CONNECTED, NB.STALLED, NB.CONNECTED], states
        r.stop()
        await a.close()

    run(scenario(), 120)


def test_a_full_outbox_refuses_and_old_waiting_batches_are_handed_back(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        back: list[object] = []
        a = await NB.Bridge(settings(c, "a", outbox_max_bytes=1000, outbox_max_age=0.5),
                            on_handed_back=lambda tokens, why: back.extend(tokens)).start()
        c.nodes[0].kill()
        deadline = time.monotonic() + 15
        while a.state != NB.DISCONNECTED and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert a.state == NB.DISCONNECTED
        assert a.submit(b"x" * 600, token="first")
        assert not a.submit(b"y" * 600, token="refused"), "past outbox_max_bytes a batch is refused"
        assert a.submit(b"z" * 100, token="second")
        deadline = time.monotonic() + 10
        while not back and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # The head may already be with NATS (in flight): only batches behind it are handed back.
        assert back == ["second"] or back == ["first", "second"] or back == ["second", "first"], back
        await a.close(say_bye=False)

    run(scenario(), 60)


# -- TLS and authentication ------------------------------------------------------------------

@pytest.mark.slow
def test_tls_and_password_work_and_a_client_without_credentials_is_refused(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(3, tls_auth=True)
    a = c.auth
    assert a is not None
    good = dict(user=a.user, password_file=a.password_file, ca_file=a.ca, cert_file=a.client_cert,
                key_file=a.client_key, replicas=3)

    async def scenario() -> None:
        x = await NB.Bridge(settings(c, "x", **good)).start()
        y = await NB.Bridge(settings(c, "y", **good)).start()
        r = Reader(y)
        x.submit(b"x:over tls")
        await r.until(lambda: len(r.batches()) == 1, 15, "a batch over TLS")
        assert x.nc is not None and x.nc.connected_url is not None and x.nc.connected_url.scheme == "tls"
        r.stop()
        await x.close()
        await y.close()
        no_password = dict(good, user=None, password_file=None)
        with pytest.raises(NB.NatsError, match="authorization violation"):
            await NB.Bridge(settings(c, "z", **no_password)).start()
        wrong = Path(c.dir) / "wrong"
        wrong.write_text("not-the-password\n")
        with pytest.raises(NB.NatsError, match="authorization violation"):
            await NB.Bridge(settings(c, "z", **dict(good, password_file=str(wrong)))).start()
        no_cert = dict(good, cert_file=None, key_file=None)
        with pytest.raises(NB.NatsError, match="cannot reach NATS"):
            await NB.Bridge(settings(c, "z", **no_cert)).start()
        no_ca = dict(good, ca_file=None)
        with pytest.raises(NB.NatsError, match="TLS failed|CERTIFICATE_VERIFY_FAILED|certificate"):
            await NB.Bridge(settings(c, "z", **no_ca)).start()

    run(scenario(), 90)


@pytest.mark.parametrize("tool", ["cryptography", "openssl"])
def test_certificates_made_either_way_secure_a_node(make_nats: Callable[..., NatsCluster], tool: str) -> None:
    if tool == "cryptography":
        pytest.importorskip("cryptography")
    elif shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    c = make_nats(1, tls_auth=True, tls_tool=tool)
    a = c.auth
    assert a is not None

    async def scenario() -> None:
        x = await NB.Bridge(settings(c, "x", user=a.user, password_file=a.password_file, ca_file=a.ca,
                                     cert_file=a.client_cert, key_file=a.client_key)).start()
        assert x.nc is not None and x.nc.connected_url is not None and x.nc.connected_url.scheme == "tls"
        await x.close()

    run(scenario(), 30)


# -- claims ----------------------------------------------------------------------------------

def test_kv_claim_race_has_exactly_one_winner(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        bridges = [await NB.Bridge(settings(c, f"h{i}")).start() for i in range(4)]
        claims = [await NB.KvClaims.open(b, "chatcluster_main_nicks") for b in bridges]
        for rnd in range(5):
            key = f"nick.alice{rnd}"
            tries = [(i, j) for i in range(len(claims)) for j in range(25)]
            results = await asyncio.gather(*(claims[i].claim(key, f"h{i}/{j}".encode()) for i, j in tries))
            winners = [t for t, rev in zip(tries, results, strict=True) if rev is not None]
            assert len(winners) == 1, f"{len(winners)} winners of {key}"
            (wi, wj), = winners
            rev = results[tries.index((wi, wj))]
            assert await claims[0].owner(key) == (f"h{wi}/{wj}".encode(), rev)
            assert not await claims[1].release(key, rev + 1), "a release must name the current revision"
            assert await claims[2].release(key, rev)
            assert await claims[3].claim(key, b"next") is not None, "a released key can be claimed again"
        for b in bridges:
            await b.close()

    run(scenario(), 90)


def test_claims_in_the_stream_are_decided_alike_on_every_host(make_nats: Callable[..., NatsCluster]) -> None:
    """The recommended design: claims travel in the stream; each host applies first-claim-wins in stream order."""
    c = make_nats(3)

    async def scenario() -> None:
        bridges = [await NB.Bridge(settings(c, f"h{i}", replicas=3)).start() for i in range(3)]
        readers = [Reader(b) for b in bridges]
        for j in range(20):
            for i, b in enumerate(bridges):
                b.submit(f"claim alice by h{i}/{j}".encode())
        for r in readers:
            await r.until(lambda r=r: len(r.batches()) == 60, 30, "all 60 claims")

        def winner(r: Reader) -> tuple[int, str]:
            roster: dict[str, str] = {}
            for x in r.batches():
                _, key, _, who = x.data.decode().split()
                roster.setdefault(key, who)  # the first claim in stream order wins
            first = next(x for x in r.batches())
            return first.seq, roster["alice"]

        verdicts = {winner(r) for r in readers}
        assert len(verdicts) == 1, f"hosts disagree: {verdicts}"
        for r in readers:
            r.stop()
        for b in bridges:
            await b.close()

    run(scenario(), 60)


# -- host liveness ---------------------------------------------------------------------------

class HostProcess:
    """tests/nats_host.py in a process of its own (optionally inside a network namespace)."""

    def __init__(self, node: str, urls: list[str], replicas: int = 1, netns: Netns | None = None) -> None:
        argv = [sys.executable, HOST_SCRIPT, node, ",".join(urls), str(replicas)]
        kw: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, bufsize=1)
        if netns is not None:
            self.proc = netns.popen(argv, **kw)  # type: ignore[arg-type]
        else:
            self.proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_stop_with_parent, **kw)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        for ev in self.seen:
            if cond(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.events.empty():
                err = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
                raise AssertionError(f"host process: condition not met; seen {self.seen[-6:]} {err[-800:]}")
            try:
                ev = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            self.seen.append(ev)
            if cond(ev):
                return ev

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


@pytest.fixture
def host_processes() -> Iterator[list[HostProcess]]:
    made: list[HostProcess] = []
    yield made
    for h in made:
        h.kill()


@pytest.mark.slow
def test_a_killed_host_is_gone_everywhere_at_one_point_within_10_s(
        make_nats: Callable[..., NatsCluster], host_processes: list[HostProcess]) -> None:
    c = make_nats(3)
    victim, o1, o2 = (HostProcess(n, c.urls, 3) for n in ("victim", "o1", "o2"))
    host_processes += [victim, o1, o2]
    for h in (victim, o1, o2):
        h.wait(lambda e: "ready" in e)
    inc = victim.wait(lambda e: "ready" in e)["ready"]
    for o in (o1, o2):
        o.wait(lambda e: e.get("up") == "victim")
    victim.kill()
    killed = time.monotonic()
    gone = [o.wait(lambda e: e.get("gone") == "victim", timeout=15) for o in (o1, o2)]
    took = time.monotonic() - killed
    assert took < 10, f"the dead host was declared gone after {took:.1f} s"
    assert gone[0] == gone[1] == {"gone": "victim", "inc": inc, "reason": "lease", "seq": gone[0]["seq"]}
    sys.stderr.write(f"\nkill -9 of a host: gone everywhere after {took:.1f} s, at stream seq {gone[0]['seq']}\n")


@pytest.mark.slow
def test_a_cut_off_host_is_let_go_and_comes_back_as_a_new_incarnation(
        make_nats: Callable[..., NatsCluster], host_processes: list[HostProcess]) -> None:
    c = make_nats(1)
    victim, other = HostProcess("victim", c.urls), HostProcess("other", c.urls)
    host_processes += [victim, other]
    old = victim.wait(lambda e: "ready" in e)["ready"]
    other.wait(lambda e: e.get("up") == "victim" and e.get("inc") == old)
    victim.signal(signal.SIGSTOP)  # frozen: as good as cut off from NATS
    other.wait(lambda e: e.get("gone") == "victim", timeout=15)
    victim.signal(signal.SIGCONT)
    back = other.wait(lambda e: e.get("up") == "victim" and e.get("inc") != old, timeout=20)
    victim.wait(lambda e: e.get("gone") == "victim" and e.get("inc") == old)
    victim.say("victim:after")
    line = other.wait(lambda e: e.get("batch") == "victim:after")
    assert line["seq"] > back["seq"]


def test_a_graceful_close_lets_the_host_go_at_once(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        b = await NB.Bridge(settings(c, "b")).start()
        r = Reader(a)
        await r.until(lambda: any(u.node == "b" for u in r.of(H.HostUp)), 10, "b up")
        await b.close()
        await r.until(lambda: any(g.node == "b" for g in r.of(H.HostGone)), 5, "b gone")
        assert [g.reason for g in r.of(H.HostGone)] == ["stopped"]
        r.stop()
        await a.close()

    run(scenario(), 30)


# -- hosts with their own addresses ------------------------------------------------------------

@pytest.mark.slow
def test_hosts_in_their_own_network_namespaces_share_the_stream(
        make_nats: Callable[..., NatsCluster], host_processes: list[HostProcess]) -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with TestLan() as lan:
        nats_ns, ns1, ns2 = lan.add(), lan.add(), lan.add()
        c = make_nats(1, netns=[nats_ns])
        try:
            h1 = HostProcess("h1", c.urls, netns=ns1)
            h2 = HostProcess("h2", c.urls, netns=ns2)
            host_processes += [h1, h2]
            for h in (h1, h2):
                h.wait(lambda e: "ready" in e)
            h1.wait(lambda e: e.get("up") == "h2")
            h1.say("h1:hello from " + ns1.addr)
            h2.say("h2:hello from " + ns2.addr)
            for h in (h1, h2):
                h.wait(lambda e: e.get("batch") == "h1:hello from " + ns1.addr)
                h.wait(lambda e: e.get("batch") == "h2:hello from " + ns2.addr)
            # The NATS server saw the two hosts come from their own addresses.
            conns = c.nodes[0].monitor("/connz") or {}
            ips = {x.get("ip") for x in conns.get("connections", [])}  # type: ignore[union-attr]
            assert {ns1.addr, ns2.addr} <= ips, ips
        finally:
            for h in host_processes:
                h.kill()
            c.stop()


# -- packing, hellos, marks, reading back, snapshots ---------------------------------------------

def test_batches_waiting_behind_the_one_in_flight_are_packed_and_read_back_one_by_one(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        r = Reader(a)
        sent = [f"a:{i}".encode() for i in range(300)]
        for x in sent:
            assert a.submit(x)
        await r.until(lambda: len(r.batches()) == 300, 20, "all 300 batches")
        assert [b.data for b in r.batches()] == sent
        messages = {b.seq for b in r.batches()}
        assert len(messages) < 300, "nothing was packed"
        r.stop()
        await a.close()

    run(scenario())


def test_a_hello_says_what_the_host_gave_and_marks_follow_every_message(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = NB.Bridge(settings(c, "a"))
        a.hello = lambda: b'{"workers": ["w1@a"]}'
        await a.start()
        items: list[NB.Item] = []

        async def read() -> None:
            async for item in a.read(0, marks=True):
                items.append(item)

        task = asyncio.create_task(read())
        a.submit(b"x")
        deadline = time.monotonic() + 10
        while not any(isinstance(i, NB.Batch) for i in items) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        hellos = [i for i in items if isinstance(i, NB.HostHello)]
        assert [(h.node, h.data) for h in hellos] == [("a", b'{"workers": ["w1@a"]}')]
        seqs = [i.seq for i in items if isinstance(i, NB.Mark)]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
        batch = next(i for i in items if isinstance(i, NB.Batch))
        after = items[items.index(batch) + 1]
        assert isinstance(after, NB.Mark) and after.seq == batch.seq, "a mark closes each message"
        task.cancel()
        await a.close()

    run(scenario())


def test_scan_reads_a_range_back_without_the_host_book(make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        for i in range(5):
            a.submit(f"a:{i}".encode())
            await acknowledged(a)
        last = a.stats.last_acked_seq
        got = [b async for b in a.scan(last - 3, last - 1)]
        assert [b.data for b in got] == [b"a:1", b"a:2", b"a:3"]
        assert a.book.last_seq == 0, "the host book saw nothing of it"
        assert await a.stream_bounds() == (1, last)
        await a.close()

    run(scenario())


def test_the_snapshot_store_keeps_the_newest_in_parts_and_an_older_one_does_not_replace_it(
        make_nats: Callable[..., NatsCluster]) -> None:
    c = make_nats(1)

    async def scenario() -> None:
        a = await NB.Bridge(settings(c, "a")).start()
        b = await NB.Bridge(settings(c, "b")).start()
        sa, sb = await NB.SnapshotStore.open(a), await NB.SnapshotStore.open(b)
        assert await sa.read() is None
        sa.part_size = 4096  # several parts
        big = bytes(random.Random(1).getrandbits(8) for _ in range(20_000))
        assert await sa.write(100, big)
        assert await sb.read() == (100, big)
        assert not await sb.write(90, b"older"), "an older snapshot must not replace a newer one"
        assert await sb.write(120, b"newer")
        assert await sa.read() == (120, b"newer")
        assert await sa.write(130, big[:5000])  # the writer's other slot: the parts of 100 are overwritten
        assert await sb.read() == (130, big[:5000])
        await a.close()
        await b.close()

    run(scenario())
