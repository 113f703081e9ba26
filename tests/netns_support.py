"""Test helper: network namespaces joined by a private test LAN, for tests of hosts with their own addresses.

`TestLan` makes a Linux bridge in the root namespace (with no address of its
own) and, per `add()`, a network namespace joined to it by a veth pair, with
an address from 198.18.0.0/15 (the range RFC 2544 keeps for network tests).
Namespaces reach each other over the bridge; the root namespace has no
address there, so nothing in the test can connect from the root namespace to
a namespace: every client runs inside one (`Netns.popen`, `Netns.run`).
`close()` deletes every namespace, link and bridge it made, by name.
`netns_available()` tells whether this machine allows all this (root,
`ip netns add`, veth, bridge), so tests skip cleanly where it does not.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from conftest import _stop_with_parent

IP = shutil.which("ip") or "/usr/sbin/ip"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=20, check=check)


@functools.cache
def netns_available() -> tuple[bool, str]:
    """(True, "") when namespaces, veth pairs and a bridge can be made here; else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if not os.path.exists(IP):
        return False, "the ip command (iproute2) is not installed"
    try:
        with TestLan() as lan:
            ns = lan.add()
            out = ns.run([IP, "-o", "addr", "show"]).stdout
            if ns.addr not in out:
                return False, "the namespace did not get its address"
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        return False, f"ip netns is not allowed here ({str(e).strip()[:200]})"
    return True, ""


@dataclass
class Netns:
    name: str
    addr: str

    def argv(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace; it dies with the test process (PR_SET_PDEATHSIG)."""
        return subprocess.Popen(self.argv(argv), start_new_session=True,  # type: ignore[call-overload,no-any-return]
                                preexec_fn=_stop_with_parent, **kw)

    def run(self, argv: list[str], timeout: float = 60, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout, check=check,
                              input=input)

    def python(self, code: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run Python code inside the namespace with this interpreter (and the repo on sys.path)."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check)


class TestLan:
    __test__ = False  # a helper, not a test class
    """A bridge plus namespaces on 198.18.X.0/24; use as a context manager."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"ccb{tag}"
        self.prefix = self._free_subnet(os.getpid())
        self.namespaces: list[Netns] = []
        self._links: list[str] = []
        self._made_bridge = False

    @staticmethod
    def _free_subnet(seed: int) -> str:
        used = _ip("-o", "addr", "show", check=False).stdout
        for i in range(512):
            n = (seed + i) % 512
            prefix = f"198.{18 + n // 256}.{n % 256}"
            if f" {prefix}." not in used:
                return prefix
        raise RuntimeError("no free /24 in 198.18.0.0/15")

    def __enter__(self) -> TestLan:
        try:
            r = _ip("link", "add", self.bridge, "type", "bridge", check=False)
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            self._made_bridge = True
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self) -> Netns:
        idx = len(self.namespaces) + 1
        ns = Netns(f"{self.bridge}n{idx}", f"{self.prefix}.{idx + 1}")
        outer, inner = f"{self.bridge}v{idx}", f"{self.bridge}i{idx}"
        r = _ip("netns", "add", ns.name, check=False)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        self.namespaces.append(ns)
        r = _ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns.name, check=False)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        self._links.append(outer)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        for args in (["addr", "add", f"{ns.addr}/24", "dev", inner], ["link", "set", inner, "up"],
                     ["link", "set", "lo", "up"]):
            _ip("-n", ns.name, *args)
        return ns

    def cut(self, ns: Netns) -> None:
        """Take the namespace's link to the test LAN down: its processes live on, cut off from everyone."""
        _ip("-n", ns.name, "link", "set", self._inner(ns), "down")

    def mend(self, ns: Netns) -> None:
        _ip("-n", ns.name, "link", "set", self._inner(ns), "up")

    def _inner(self, ns: Netns) -> str:
        return f"{self.bridge}i{self.namespaces.index(ns) + 1}"

    def close(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "del", ns.name, check=False)
        for link in self._links:
            _ip("link", "del", link, check=False)  # usually gone with its namespace already
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
        self.namespaces.clear()
        self._links.clear()
        self._made_bridge = False
