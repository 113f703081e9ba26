"""Print what each real telnet/nc client sends for every action of pty_support.ACTIONS.

Run `python tests/record_client_bytes.py` to regenerate the measurements kept in
tests/client_bytes.py; tests/test_real_clients.py checks them against the clients installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pty_support import ACTIONS, CLIENTS, missing, record_session  # noqa: E402


def show(data: bytes, typed: bytes, enter: bytes) -> str:
    """`data` as Python source, short when it is just what was typed."""
    if data == typed + enter and typed:
        return f"{typed!r} + ENTER" if len(typed) < 40 else "LONG + ENTER"
    return f"bytes.fromhex({data.hex(' ')!r})" if data else 'b""'


def main() -> None:
    typed = {name: "".join(k for k in keys if not k.startswith("<")).encode() for name, keys in ACTIONS}
    typed["backspace"] = b"abXY"
    for kind in CLIENTS.values():
        reason = missing(kind)
        if reason:
            print(f"# {kind.name}: skipped: {reason}")
            continue
        for telnet in (None, "always", "on-iac"):
            got = record_session(kind, telnet)
            print(f"    ({kind.name!r}, {telnet!r}): {{  # ENTER = {got['enter']!r}")
            for name, data in got.items():
                print(f"        {name!r}: {show(data, typed.get(name, b''), got['enter'])},")
            print("    },")


if __name__ == "__main__":
    main()
