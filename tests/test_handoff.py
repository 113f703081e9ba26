"""Specification of chatcluster.handoff's wire: messages, descriptors and client state between generations.

Everything here goes through real Unix socket pairs with real descriptors
(pipes and live TCP connections) passed by SCM_RIGHTS. A format 1 message is
kept verbatim: every later version must still read it.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from chatcluster import handoff as H
from chatcluster.protocol import Line, LineReader, LineTooLong, TokenBucket

# A CLIENTS message as format 1 wrote it, byte for byte. Never edit it: it is what a
# running old version sends to the new one during an upgrade.
FORMAT_1_CLIENTS = (
    b'{"format":1,"kind":"clients","fds":1,"clients":[{"conn":7,"ip":"127.0.0.1","nick":"alice",'
    b'"since":1700000000.5,"reader":{"format":1,"max_line_bytes":512,"partial":"aGFsZiBhIGxp",'
    b'"telnet":"data","discard":false,"after_cr":false,"overflowed":false},'
    b'"bucket":{"rate":5.0,"burst":10,"tokens":3.5},"out":"Ym9iOiBoaQ0KKioqIGNhcm9sIGpvaW5lZA0K",'
    b'"lines":["held one",{"too_long":512}],"unread":"c2Vjb25kCg==","eof":false,"idle":12.25}]}'
)


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def receive_all(sock: socket.socket, reader: H.FrameReader, count: int) -> list[H.Frame]:
    """Blocking reads until `count` messages are complete."""
    frames: list[H.Frame] = []
    sock.settimeout(10)
    while len(frames) < count:
        data, fds, flags, _ = socket.recv_fds(sock, 4096, H.MAX_FDS_PER_FRAME + 1)
        assert not flags & socket.MSG_CTRUNC
        assert data, "the sender closed early"
        frames.extend(reader.feed(data, fds))
    return frames


def pipes(n: int) -> list[tuple[int, int]]:
    return [os.pipe() for _ in range(n)]


def test_a_message_carries_its_descriptors(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    ps = pipes(3)
    H.send(a, H.CLIENTS, {"clients": [1, 2, 3]}, [r for r, _ in ps])
    [frame] = receive_all(b, H.FrameReader(), 1)
    assert frame.kind == H.CLIENTS
    assert frame.body["clients"] == [1, 2, 3]
    assert len(frame.fds) == 3
    for i, ((r, w), got) in enumerate(zip(ps, frame.fds, strict=True)):
        os.close(r)  # the sender's copy; the received one must still read the pipe
        os.write(w, b"pipe %d" % i)
        assert os.read(got, 100) == b"pipe %d" % i
        os.close(w)
        os.close(got)


def test_descriptors_stay_with_their_own_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    ps = pipes(3)
    H.send(a, H.HELLO, {"n": 1}, [ps[0][0]])
    H.send(a, H.END, {"n": 2})
    H.send(a, H.CLIENTS, {"n": 3}, [ps[1][0], ps[2][0]])
    frames = receive_all(b, H.FrameReader(), 3)
    assert [(f.body["n"], len(f.fds)) for f in frames] == [(1, 1), (2, 0), (3, 2)]
    for (r, w), got, tag in zip(ps, [frames[0].fds[0], *frames[2].fds], (b"a", b"b", b"c"), strict=True):
        os.write(w, tag)
        assert os.read(got, 10) == tag
        for fd in (r, w, got):
            os.close(fd)


def test_messages_split_at_any_byte_come_out_the_same() -> None:
    stream = H.encode(H.HELLO, {"worker": "w1", "text": "é" * 20}) + H.encode(H.END, {"token": 3})
    whole = H.FrameReader().feed(stream)
    assert [(f.kind, f.body.get("token")) for f in whole] == [(H.HELLO, None), (H.END, 3)]
    for cut in range(1, len(stream)):
        reader = H.FrameReader()
        split = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert split == whole, cut
    reader = H.FrameReader()
    one_by_one = [f for i in range(len(stream)) for f in reader.feed(stream[i:i + 1])]
    assert one_by_one == whole


def test_a_live_tcp_connection_moves_to_another_owner(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server_side, _ = listener.accept()
        client.sendall(b"typed before the move\n")
        H.send(a, H.CLIENTS, {"clients": [{}]}, [server_side.fileno()])
        server_side.close()  # the giver lets go; the connection must stay up
        [frame] = receive_all(b, H.FrameReader(), 1)
        moved = socket.socket(fileno=frame.fds[0])
        assert moved.type == socket.SOCK_STREAM and moved.family == socket.AF_INET
        moved.settimeout(10)
        assert moved.recv(100) == b"typed before the move\n"
        moved.sendall(b"hello from the new owner\r\n")
        assert client.recv(100) == b"hello from the new owner\r\n"
        moved.close()
        client.close()


def test_sending_too_many_descriptors_at_once_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ValueError, match="at most 200"):
        H.send(pair[0], H.CLIENTS, {}, [0] * (H.MAX_FDS_PER_FRAME + 1))


def test_receive_reads_until_it_would_block_and_reports_the_end(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.setblocking(False)
    reader = H.FrameReader()
    assert H.receive(b, reader) == ([], False)
    H.send(a, H.ACCEPT, {"worker": "w5"})
    H.send(a, H.ACK, {"adopted": 2})
    frames, ended = H.receive(b, reader)
    assert [f.kind for f in frames] == [H.ACCEPT, H.ACK] and not ended
    a.close()
    assert H.receive(b, reader) == ([], True)


def test_descriptors_without_their_message_are_closed_by_close() -> None:
    r, w = os.pipe()
    reader = H.FrameReader()
    assert reader.feed(H.encode(H.CLIENTS, {}, 1)[:5], [r]) == []
    reader.close()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


# -- versions --------------------------------------------------------------------------------


def test_format_1_client_state_is_read_by_this_version() -> None:
    r, w = os.pipe()
    frame_bytes = H.LENGTH.pack(len(FORMAT_1_CLIENTS)) + FORMAT_1_CLIENTS
    [frame] = H.FrameReader().feed(frame_bytes, [r])
    assert frame.kind == H.CLIENTS and frame.fds == [r]
    st = H.state_from_wire(frame.body["clients"][0], now=100.0)
    assert (st.conn, st.ip, st.nick, st.since) == (7, "127.0.0.1", "alice", 1700000000.5)
    assert st.out == b"bob: hi\r\n*** carol joined\r\n"
    assert st.lines == [Line("held one"), LineTooLong(512)]
    assert st.unread == b"second\n"
    assert (st.eof, st.idle) == (False, 12.25)
    # The half line typed before the move is completed by what comes after it.
    assert st.reader.feed(b"ne\n") == [Line("half a line")]
    assert st.bucket.available(100.0) == 3 and st.bucket.rate == 5.0
    os.close(r)
    os.close(w)


def test_a_message_from_newer_code_is_refused_with_a_clear_error() -> None:
    newer = json.dumps({"format": H.FORMAT + 1, "kind": H.HELLO, "fds": 0}).encode()
    with pytest.raises(H.HandoffError, match=r"comes from newer code.*upgrade to code at least as new"):
        H.FrameReader().feed(H.LENGTH.pack(len(newer)) + newer)


@pytest.mark.parametrize("message", [b"[1, 2]", b"not json", b'{"kind": "hello"}', b'{"format": "1"}'])
def test_a_malformed_message_is_refused(message: bytes) -> None:
    with pytest.raises(H.HandoffError):
        H.FrameReader().feed(H.LENGTH.pack(len(message)) + message)


def test_a_message_announcing_more_descriptors_than_arrived_is_refused() -> None:
    with pytest.raises(H.HandoffError, match="announces 2 descriptors, 0 arrived"):
        H.FrameReader().feed(H.encode(H.CLIENTS, {}, 2))


@pytest.mark.parametrize("field, value, problem", [
    ("nick", "no spaces allowed", "invalid nickname"),
    ("out", "***", "malformed"),
    ("conn", "7", "malformed"),
    ("reader", {"format": 99}, "malformed"),
])
def test_malformed_client_state_is_refused(field: str, value: object, problem: str) -> None:
    good = json.loads(FORMAT_1_CLIENTS)["clients"][0]
    with pytest.raises(H.HandoffError, match=problem):
        H.state_from_wire({**good, field: value}, now=0.0)


def test_client_state_survives_the_wire_mid_telnet_command() -> None:
    reader = LineReader(64)
    assert reader.feed(b"caf\xc3\xa9 \xff\xfb") == []  # in the middle of IAC WILL <option>
    bucket = TokenBucket(2.0, 4, now=10.0)
    assert bucket.take(10.0) and bucket.take(10.0)
    st = H.ClientState(conn=3, ip="::1", nick="bob_2", since=5.0, reader=reader, bucket=bucket,
                       out=b"\xff\x00binary\r\n", lines=[Line("x"), LineTooLong(64)], unread=b"\r\n",
                       eof=True, idle=1.5)
    wire = json.loads(json.dumps(H.state_to_wire(st, now=10.0)))
    back = H.state_from_wire(wire, now=500.0)  # another process, another clock
    assert (back.conn, back.ip, back.nick, back.since, back.out) == (3, "::1", "bob_2", 5.0, b"\xff\x00binary\r\n")
    assert back.lines == [Line("x"), LineTooLong(64)] and back.unread == b"\r\n"
    assert back.eof and back.idle == 1.5
    assert back.bucket.available(500.0) == 2  # tokens carried over, not refilled by the clock change
    assert back.reader.feed(b"\x01ok\n") == [Line("café ok")]


def test_a_format_1_client_is_in_the_default_room_only() -> None:
    st = H.state_from_wire(json.loads(FORMAT_1_CLIENTS)["clients"][0], now=0.0)
    assert (st.rooms, st.active) == ([], "")


def test_client_state_carries_its_rooms_and_the_room_it_talks_in() -> None:
    st = H.ClientState(conn=3, ip="::1", nick="bob", since=5.0, reader=LineReader(64), bucket=TokenBucket(2.0, 4, 10.0),
                       out=b"", lines=[], unread=b"", eof=False, idle=0.0, rooms=["#lobby", "#Rust"], active="#Rust")
    back = H.state_from_wire(json.loads(json.dumps(H.state_to_wire(st, now=10.0))), now=10.0)
    assert (back.rooms, back.active) == (["#lobby", "#Rust"], "#Rust")


def test_client_state_with_an_invalid_room_is_refused() -> None:
    good = json.loads(FORMAT_1_CLIENTS)["clients"][0]
    with pytest.raises(H.HandoffError, match="invalid room"):
        H.state_from_wire({**good, "rooms": ["#ok", "no hash"]}, now=0.0)
