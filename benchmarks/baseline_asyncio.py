"""The chat server a Python developer writes first, kept as the benchmarks' yardstick.

asyncio streams, one coroutine per client, and for every message a loop over the
room that calls `writer.write(...)` and then `await writer.drain()` for each
other client. It speaks the same wire format as chatcluster where the benchmarks
look (welcome line, `NICK: TEXT\\r\\n`, no echo to the sender), has no commands and
does not announce joins, so it compares with `chatcluster start --no-announce-joins`.

It is meant to be the honest first version, not a straw man: the only tuning is
a listen backlog as large as the kernel allows, so that the load generator's
connection bursts are not dropped before the server gets to see them.

    python benchmarks/baseline_asyncio.py --host 127.0.0.1 --port 7000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string

WELCOME = "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands.\r\n"
MAX_LINE = 512


class Room:
    """Everyone connected, by writer, with their nickname."""

    def __init__(self) -> None:
        self.members: dict[asyncio.StreamWriter, str] = {}

    def new_nick(self) -> str:
        taken = set(self.members.values())
        while True:
            nick = "".join(random.choices(string.ascii_lowercase, k=4))
            if nick not in taken:
                return nick

    async def broadcast(self, sender: asyncio.StreamWriter, data: bytes) -> None:
        for writer in list(self.members):
            if writer is sender:
                continue
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, RuntimeError):
                # The client went away while we were writing; its own
                # coroutine removes it from the room.
                pass


async def handle_client(room: Room, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    nick = room.new_nick()
    try:
        writer.write(WELCOME.format(nick=nick).encode())
        await writer.drain()
        room.members[writer] = nick
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # longer than the stream limit: drop the client
                break
            if not raw:
                break
            text = raw.rstrip(b"\r\n")
            if not text or len(text) > MAX_LINE:
                continue
            await room.broadcast(writer, nick.encode() + b": " + text + b"\r\n")
    except ConnectionError:
        pass
    finally:
        room.members.pop(writer, None)
        writer.close()


async def serve(host: str, port: int) -> None:
    room = Room()
    server = await asyncio.start_server(
        lambda r, w: handle_client(room, r, w), host, port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7000)
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
