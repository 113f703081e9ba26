"""A chat client as a process of its own, for tests whose clients must connect from inside a network namespace.

Usage: python tests/relay_client.py HOST PORT
Connects to HOST:PORT, then relays: every line on stdin is sent (with CRLF),
every line received is written to stdout (the telnet greeting left out).
Exits when the connection or stdin closes.
"""

from __future__ import annotations

import selectors
import socket
import sys

GREETING = b"\xff\xfd\x00\r\x00"


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.create_connection((host, port), timeout=15)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(sys.stdin.buffer, selectors.EVENT_READ)
    buf = b""
    started = False
    out = sys.stdout.buffer
    while True:
        for key, _ in sel.select():
            if key.fileobj is sock:
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                buf += chunk
                if not started:
                    if GREETING.startswith(buf):
                        continue
                    started = True
                    if buf.startswith(GREETING):
                        buf = buf[len(GREETING):]
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    out.write(line + b"\n")
                out.flush()
            else:
                line = sys.stdin.buffer.readline()
                if not line:
                    return
                sock.setblocking(True)
                sock.sendall(line.rstrip(b"\n") + b"\r\n")
                sock.setblocking(False)


if __name__ == "__main__":
    main()
