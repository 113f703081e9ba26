"""What real telnet and nc clients send, measured byte by byte, for the unit tests to replay.

Recorded with `python tests/record_client_bytes.py`: each client ran in a tmux pane (UTF-8
locale, the terminal's default special keys: intr ^C, quit ^\\, susp ^Z, discard ^O) against a
plain socket server that logged every byte and answered either nothing (None: a server without
negotiation) or as chatcluster's telnet layer in the given mode. Clients: GNU inetutils-telnet
2.4 (Debian's `telnet`), BusyBox 1.35 `telnet`, PuTTY 0.78 `plink -telnet`, OpenBSD `nc`.
tests/test_real_clients.py records them again and checks they still send exactly this.

Keys of SENT: (client, server negotiation). Per action (see pty_support.ACTIONS): "connect" is
what the client sent before the user typed, "enter" how its first line ended, and the others
what each action put on the wire.
"""

from __future__ import annotations

SAMPLE = "é ✓ 世界 😀 Ü у К я"
LONG = "0123456789" * 60

# inetutils without BINARY clears the 8th bit of each typed byte before comparing it with the
# terminal's special keys: the second bytes of ✓ and Ü (9C: ^\ quit) become IAC BRK, of у (83:
# ^C) IAC IP, of К (9A: ^Z) IAC SUSP, of я (8F: ^O) IAC AO, each followed by IAC DO TIMING-MARK.
INETUTILS_7BIT_SAMPLE = bytes.fromhex(
    "c3a9 20 e2 fff3 fffd06 93 20 e4b896 e7958c 20 f09f9880 20 c3 fff3 fffd06 20 d1 fff4 fffd06"
    " 20 d0 ffed fffd06 20 d1 fff5 fffd06"
)
INETUTILS_CTRL_C = bytes.fromhex("fff4 fffd06")  # IAC IP, IAC DO TIMING-MARK (the typed line is dropped by the tty)
INETUTILS_CTRL_Z = bytes.fromhex("ffed fffd06")  # IAC SUSP, IAC DO TIMING-MARK
INETUTILS_WILL_BINARY = bytes.fromhex("fffb00")
BUSYBOX_WONT_BINARY = bytes.fromhex("fffc00")
# plink offers NAWS, TSPEED, TTYPE, NEW-ENVIRON and SGA and asks for ECHO and SGA at once.
PLINK_OPENING = bytes.fromhex("fffb1f fffb20 fffb18 fffb27 fffd01 fffb03 fffd03")
# ... and, told DONT NEW-ENVIRON, it offers the old ENVIRON; it accepts our DO BINARY.
PLINK_AFTER_ANSWERS = bytes.fromhex("fffb00 fffb24")

_UTF8 = SAMPLE.encode()
_LONG = LONG.encode()


def _session(enter: bytes, connect: bytes = b"", sample: bytes | None = None, ctrl_z: bytes = b"",
             ctrl_c: bytes = b"", later_enter: bytes | None = None) -> dict[str, bytes]:
    after = enter if later_enter is None else later_enter
    return {
        "connect": connect,
        "enter": enter,
        "ascii": b"hello there" + enter,
        "sample": (_UTF8 + enter) if sample is None else sample,
        "ctrl-z": ctrl_z,
        "backspace": b"abXY" + after,
        "long": _LONG + after,
        "ctrl-c": ctrl_c,
    }


SENT: dict[tuple[str, str | None], dict[str, bytes]] = {
    ("inetutils", None): _session(
        b"\r\n", sample=INETUTILS_7BIT_SAMPLE + b"\r\n", ctrl_z=INETUTILS_CTRL_Z, ctrl_c=INETUTILS_CTRL_C
    ),
    # With BINARY on, inetutils sends the UTF-8 untouched and ends lines with a bare LF.
    ("inetutils", "always"): _session(
        b"\n", connect=INETUTILS_WILL_BINARY, ctrl_z=INETUTILS_CTRL_Z, ctrl_c=INETUTILS_CTRL_C
    ),
    # The first IAC of the session (the ✓'s BRK) brings our DO BINARY; the client answers it
    # (here after the line it was sending; see inetutils_sample_switching_to_binary) and
    # switches to 8-bit bytes and LF endings from then on.
    ("inetutils", "on-iac"): _session(
        b"\r\n", sample=INETUTILS_7BIT_SAMPLE + b"\r\n" + INETUTILS_WILL_BINARY, ctrl_z=INETUTILS_CTRL_Z,
        ctrl_c=INETUTILS_CTRL_C, later_enter=b"\n",
    ),
    # busybox's Ctrl-C opens a local menu and its Ctrl-Z is the terminal's: neither sends a byte.
    ("busybox", None): _session(b"\r\n"),
    ("busybox", "always"): _session(b"\r\n", connect=BUSYBOX_WONT_BINARY),
    ("busybox", "on-iac"): _session(b"\r\n"),
    # plink and nc: Ctrl-C ends the program; Ctrl-Z sends nothing (the tty drops the typed line).
    ("plink", None): _session(b"\n", connect=PLINK_OPENING),
    ("plink", "always"): _session(b"\n", connect=PLINK_OPENING + PLINK_AFTER_ANSWERS),
    ("plink", "on-iac"): _session(b"\n", connect=PLINK_OPENING + PLINK_AFTER_ANSWERS),
    ("nc", None): _session(b"\n"),
    ("nc", "always"): _session(b"\n"),
    ("nc", "on-iac"): _session(b"\n"),
}


def inetutils_sample_switching_to_binary() -> list[bytes]:
    """Every way inetutils can send SAMPLE when BINARY is asked for at its first IAC (on-iac).

    The client acts on the server's DO BINARY whenever it reads it: after any character that
    made it flush (each one that became a command), or only after the line. From then on it
    sends 8-bit bytes and ends lines with LF, so the recorded bytes depend on timing; each
    possibility is one of these.
    """
    seven = {"✓": "e2 fff3 fffd06 93", "Ü": "c3 fff3 fffd06", "у": "d1 fff4 fffd06", "К": "d0 ffed fffd06",
             "я": "d1 fff5 fffd06"}
    chars = list(SAMPLE)
    encode7 = [bytes.fromhex(seven[c]) if c in seven else c.encode() for c in chars]
    assert b"".join(encode7) == INETUTILS_7BIT_SAMPLE
    variants = [INETUTILS_7BIT_SAMPLE + b"\r\n" + INETUTILS_WILL_BINARY]
    for k, c in enumerate(chars, 1):
        if c in seven:
            variants.append(b"".join(encode7[:k]) + INETUTILS_WILL_BINARY + "".join(chars[k:]).encode() + b"\n")
    return variants


# A few more characters from inetutils without BINARY, recorded one line each: ą (C4 85) loses
# its second byte (85 & 7F is ^E, which the client swallows) and Н (D0 9D) sends D0 and then
# opens the client's `telnet>` prompt (9D & 7F is ^], its escape key), so neither can be put
# back; ĕ (C4 95, ^U) goes through, since the terminal's own line editing already ran.
INETUTILS_7BIT_LINES = {"ą a": bytes.fromhex("c4 20 61 0d 0a"), "eĕ": bytes.fromhex("65 c4 95 0d 0a")}
