"""Every setting of chatcluster, declared once.

Each `Setting` carries its default, its type, its validation, its command-line
flag, whether it can change on a live reload, and the line of documentation that
the default config file and the README repeat. Values come from the defaults,
then the TOML file, then command-line flags, in that order. This module only
reads and validates; it never opens sockets or starts processes.
"""

from __future__ import annotations

import argparse
import os
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A setting is wrong; the message names the problem and how to fix it."""


MAX_WORKERS = 1024  # half the stats file's slots, so that a whole generation can be replaced
WORKERS_PER_CPU = 4  # more workers than this per CPU only add context switches; allow_many_workers lifts it


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, cgroup cpusets and containers restrict them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_cap(allow_many: bool, cpus: int | None = None) -> int:
    """The most workers a cluster may run: WORKERS_PER_CPU per usable CPU, or MAX_WORKERS when allowed."""
    if allow_many:
        return MAX_WORKERS
    return min(MAX_WORKERS, WORKERS_PER_CPU * (cpus or usable_cpus()))


def worker_cap_text(cpus: int | None = None) -> str:
    cpus = cpus or usable_cpus()
    return f"{WORKERS_PER_CPU} per CPU on the {cpus} CPU{'s' if cpus != 1 else ''} the cluster may use"


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    kind: type
    doc: str
    live: bool = False
    check: Callable[[Any], str | None] | None = None
    section: str = "server"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not lo <= value <= hi:
            return f"must be between {lo:g} and {hi:g}"
        return None

    return check


def _log_level(value: Any) -> str | None:
    if str(value).lower() not in ("debug", "info", "warning", "error"):
        return "must be one of debug, info, warning, error"
    return None


def _telnet_mode(value: Any) -> str | None:
    if value not in ("always", "on-iac", "off"):
        return "must be one of always, on-iac, off"
    return None


def _room(value: Any) -> str | None:
    from .rooms import room_problem  # pure, and only needed here

    problem = room_problem(str(value))
    return f"is not a valid room name: {problem}" if problem else None


def _history_db(value: Any) -> str | None:
    if not value:
        return None
    path = os.path.abspath(os.path.expanduser(str(value)))
    if os.path.isdir(path):
        return "names a directory; name a file in it, for example history.db"
    if not os.path.isdir(os.path.dirname(path)):
        return f"is in a directory that does not exist ({os.path.dirname(path)}); create it first"
    return None


def _welcome(value: Any) -> str | None:
    if "\n" in value or "\r" in value:
        return "must be a single line"
    # Every newcomer's welcome is formatted with str.format; a field it cannot fill would
    # crash the worker that accepted the client. So: formatted once here, and {nick} is the
    # only field allowed (a format spec such as {nick:>999999999} would be a memory bomb).
    fix = "(write {{ and }} for literal braces)"
    try:
        fields = [(name, conv, spec) for _, name, spec, conv in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        return f"cannot be formatted ({exc}) {fix}"
    for name, conv, spec in fields:
        if name != "nick" or conv or spec:
            field = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            return f"has the replacement field {field}, but {{nick}} is the only one allowed {fix}"
    if not fields:
        return "must contain {nick}, where the client's nickname goes"
    try:
        value.format(nick="nick")
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        return f"cannot be formatted ({exc}) {fix}"
    return None


def parse_listen(value: str) -> tuple[str, int]:
    """(host, port) of a `HOST:PORT` (`[V6ADDR]:PORT` for IPv6), or ValueError saying what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT with a port from 1 to 65535, for example 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets, for example [::1]:9464")
    return host, int(port)


def _listen_address(value: Any) -> str | None:
    try:
        if value:
            parse_listen(value)
    except ValueError as exc:
        return f"{exc} (or empty to turn it off)"
    return None


NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_NODE_NAME = 64


def _nats_servers(value: Any) -> str | None:
    for url in nats_urls(value):
        host = url.partition("://")[2]
        if not url.startswith(("nats://", "tls://")) or not host or any(c.isspace() or c == "/" for c in host):
            return (f"has {url!r}, which is not of the form nats://HOST:PORT or tls://HOST:PORT "
                    f"(separate several with commas)")
    return None


def nats_urls(value: str) -> tuple[str, ...]:
    """The URLs of a nats_servers value: comma-separated, blanks around them ignored."""
    return tuple(u.strip() for u in str(value).split(",") if u.strip())


def name_problem(value: str) -> str | None:
    """Why `value` cannot name a host (or a cluster), or None: it becomes part of worker and stream names."""
    if not 1 <= len(value) <= MAX_NODE_NAME:
        return f"must have 1 to {MAX_NODE_NAME} characters"
    if not NAME_CHARS.issuperset(value):
        return "may only hold A-Z a-z 0-9 _ and -"
    return None


def _node_name(value: Any) -> str | None:
    return name_problem(value) if value else None


def _replicas(value: Any) -> str | None:
    return None if value in (1, 3, 5) else "must be 1, 3 or 5"


def _readable_file(value: Any) -> str | None:
    if not value:
        return None
    path = os.path.expanduser(str(value))
    if not os.path.isfile(path):
        return "names no file; give the path of an existing file"
    if not os.access(path, os.R_OK):
        return "is not readable by this user; fix its permissions"
    return None


def default_node_name() -> str:
    """This machine's host name up to its first dot, the default node_name."""
    import socket

    return socket.gethostname().split(".")[0]


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "0.0.0.0", str, "Address the workers listen on."),
    Setting("port", 12345, int, "TCP port shared by all workers (SO_REUSEPORT).", check=_between(1, 65535)),
    Setting(
        "workers",
        0,
        int,
        f"Number of worker processes; 0 means one per CPU the cluster may use. At most {WORKERS_PER_CPU} per CPU "
        f"unless allow_many_workers is set.",
        check=_between(0, MAX_WORKERS),
    ),
    Setting("backlog", 4096, int, "Listen backlog of each worker's socket.", check=_between(1, 1 << 20)),
    Setting(
        "runtime_dir",
        "",
        str,
        "Private directory for the bus sockets, pid and stats files; empty means "
        "$RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR/chatcluster-PORT, else /tmp/chatcluster-UID-PORT.",
    ),
    Setting("pid_file", "", str, "Write the supervisor's pid here; empty means RUNTIME_DIR/chatcluster.pid."),
    Setting("log_level", "info", str, "debug, info, warning or error.", live=True, check=_log_level),
    Setting(
        "welcome",
        "*** Welcome to chatcluster! Your nickname is {nick}. Type /help for commands.",
        str,
        "First line a client receives; {nick} is replaced by its nickname.",
        live=True,
        check=_welcome,
        section="chat",
    ),
    Setting(
        "telnet_negotiation",
        "always",
        str,
        "always: ask telnet clients for 8-bit BINARY at connect (UTF-8 and Ctrl-C then work in every "
        "telnet); on-iac: only once a client sends telnet commands itself; off: answer no negotiation.",
        check=_telnet_mode,
        section="chat",
    ),
    Setting(
        "announce_joins",
        True,
        bool,
        "Tell everyone when someone joins or leaves; turn off for large rooms.",
        live=True,
        section="chat",
    ),
    Setting(
        "max_line_bytes",
        512,
        int,
        "Longest accepted line, in bytes, without its line ending.",
        live=True,
        check=_between(16, 65536),
        section="limits",
    ),
    Setting(
        "max_sendq_bytes",
        1 << 20,
        int,
        "A client whose unsent output exceeds this is disconnected.",
        live=True,
        check=_between(4096, 1 << 30),
        section="limits",
    ),
    Setting(
        "send_buffer_bytes",
        64 << 10,
        int,
        "Kernel send buffer of each client socket (a reload resizes the open ones too); 0 leaves it to the "
        "kernel's autotuning (megabytes), for connections made from then on. Small keeps output where "
        "backpressure sees it (fair to everyone under a flood); large sends a blast faster.",
        live=True,
        check=_between(0, 64 << 20),
        section="limits",
    ),
    Setting(
        "flood_burst",
        10,
        int,
        "Lines a client may send in a burst before flood control slows it down.",
        live=True,
        check=_between(1, 1_000_000),
        section="limits",
    ),
    Setting(
        "flood_rate",
        5.0,
        float,
        "Sustained lines per second per client; 0 turns flood control off.",
        live=True,
        check=_between(0, 1_000_000),
        section="limits",
    ),
    Setting(
        "max_clients",
        100_000,
        int,
        "Most clients connected to the whole cluster; 0 means no limit.",
        live=True,
        check=_between(0, 10_000_000),
        section="limits",
    ),
    Setting(
        "max_clients_per_ip",
        50,
        int,
        "Most clients from one address across the cluster; 0 means no limit (raise it behind a large NAT).",
        live=True,
        check=_between(0, 10_000_000),
        section="limits",
    ),
    Setting(
        "idle_timeout",
        0.0,
        float,
        "Disconnect a client that sends nothing for this many seconds; 0 means never.",
        live=True,
        check=_between(0, 10_000_000),
        section="limits",
    ),
    Setting("tcp_keepalive", True, bool, "Enable TCP keepalive so dead peers are reaped.", section="limits"),
    Setting(
        "keepalive_idle",
        60,
        int,
        "Seconds of silence before the first keepalive probe.",
        check=_between(1, 32767),
        section="limits",
    ),
    Setting(
        "keepalive_interval",
        10,
        int,
        "Seconds between keepalive probes.",
        check=_between(1, 32767),
        section="limits",
    ),
    Setting(
        "keepalive_count",
        6,
        int,
        "Unanswered probes before the connection is dropped.",
        check=_between(1, 127),
        section="limits",
    ),
    Setting(
        "graceful_timeout",
        10.0,
        float,
        "Seconds a graceful stop waits for clients' output to drain.",
        live=True,
        check=_between(0, 3600),
        section="processes",
    ),
    Setting(
        "worker_timeout",
        30.0,
        float,
        "A worker whose loop is stuck this long is killed and replaced.",
        live=True,
        check=_between(0.5, 86400),
        section="processes",
    ),
    Setting(
        "cpu_affinity",
        False,
        bool,
        "Pin worker i to CPU i mod ncpu.",
        section="processes",
    ),
    Setting(
        "allow_many_workers",
        False,
        bool,
        f"Allow more than {WORKERS_PER_CPU} workers per CPU (workers, scale, TTIN), up to {MAX_WORKERS}.",
        live=True,
        section="processes",
    ),
    Setting(
        "metrics_listen",
        "",
        str,
        "Serve Prometheus metrics at http://HOST:PORT/metrics (for example 127.0.0.1:9464); empty means off.",
        check=_listen_address,
        section="monitoring",
    ),
    # -- rooms, private messages and history -------------------------------------------------------
    Setting(
        "default_room",
        "#lobby",
        str,
        "The room every client starts in and returns to when it leaves its last room.",
        check=_room,
        section="rooms",
    ),
    Setting(
        "max_rooms_per_user",
        20,
        int,
        "Most rooms one client may be in at once.",
        live=True,
        check=_between(1, 100_000),
        section="rooms",
    ),
    Setting(
        "max_rooms",
        10_000,
        int,
        "Most rooms in the whole cluster; a room exists while someone is in it.",
        live=True,
        check=_between(1, 10_000_000),
        section="rooms",
    ),
    Setting(
        "max_room_name",
        32,
        int,
        "Longest room name, in characters after the #.",
        live=True,
        check=_between(1, 100),
        section="rooms",
    ),
    Setting(
        "history_lines",
        50,
        int,
        "Recent lines of each room kept and shown to a joiner; 0 turns history off.",
        check=_between(0, 100_000),
        section="rooms",
    ),
    Setting(
        "history_max_bytes",
        64 << 20,
        int,
        "Most bytes of history kept for all rooms together (the oldest lines go first).",
        check=_between(0, 1 << 40),
        section="rooms",
    ),
    Setting(
        "history_db",
        "",
        str,
        "SQLite file that keeps the history across a full stop and start; empty: history stays in memory.",
        check=_history_db,
        section="rooms",
    ),
    # -- several hosts sharing one conversation through NATS JetStream (docs/multihost.md) ------------
    Setting(
        "nats_servers",
        "",
        str,
        "NATS servers of a multi-host cluster, comma-separated (nats://HOST:4222 or tls://HOST:4222); empty "
        "means one host with its embedded bus.",
        check=_nats_servers,
        section="multihost",
    ),
    Setting(
        "node_name",
        "",
        str,
        "This host's name among the hosts (A-Z a-z 0-9 _ -, unique per host); empty means the hostname.",
        check=_node_name,
        section="multihost",
    ),
    Setting(
        "nats_cluster",
        "main",
        str,
        "Name of the shared conversation: its stream is CHATCLUSTER_<name>; hosts with the same name chat together.",
        check=_node_name,
        section="multihost",
    ),
    Setting(
        "nats_replicas",
        1,
        int,
        "Copies JetStream keeps of the stream: 1, or 3 on a 3-node NATS cluster (survives the loss of a node).",
        check=_replicas,
        section="multihost",
    ),
    Setting(
        "nats_user",
        "",
        str,
        "NATS user name; its password is read from nats_password_file.",
        section="multihost",
    ),
    Setting(
        "nats_password_file",
        "",
        str,
        "File holding the NATS password (never given on the command line).",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_creds_file",
        "",
        str,
        "NATS credentials file (JWT and NKey seed) for decentralised authentication.",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_nkey_seed_file",
        "",
        str,
        "File holding an NKey seed to authenticate with.",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_ca_file",
        "",
        str,
        "CA certificate (PEM) that NATS servers' certificates are checked against.",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_cert_file",
        "",
        str,
        "Client certificate (PEM) this host presents to NATS; needs nats_key_file.",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_key_file",
        "",
        str,
        "Private key (PEM) of nats_cert_file.",
        check=_readable_file,
        section="multihost",
    ),
    Setting(
        "nats_hold_seconds",
        30.0,
        float,
        "While NATS is away, lines are held for up to this many seconds; older ones are dropped and their "
        "senders told.",
        check=_between(1, 3600),
        section="multihost",
    ),
    Setting(
        "nats_max_age",
        86400.0,
        float,
        "Seconds the stream keeps the chat: history and hosts that start later read it from there.",
        check=_between(60, 365 * 86400),
        section="multihost",
    ),
    Setting(
        "nats_max_bytes",
        1 << 30,
        int,
        "Most bytes the stream keeps (the oldest batches go first).",
        check=_between(1 << 20, 1 << 50),
        section="multihost",
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


@dataclass(frozen=True)
class Config:
    """A validated set of values, one attribute per setting."""

    values: dict[str, Any] = field(default_factory=dict)
    source: str = "defaults"

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def worker_count(self) -> int:
        return self.values["workers"] or usable_cpus()

    def live_changes(self, new: Config) -> tuple[dict[str, Any], list[str]]:
        """Split the differences to `new` into live-applicable values and names needing a restart."""
        live: dict[str, Any] = {}
        restart: list[str] = []
        for s in SETTINGS:
            if self.values[s.name] != new.values[s.name]:
                if s.live:
                    live[s.name] = new.values[s.name]
                else:
                    restart.append(s.name)
        return live, restart


def coerce(setting: Setting, raw: Any, where: str) -> Any:
    """Turn a raw value into the setting's type, or raise a ConfigError naming the fix."""
    name, kind = setting.name, setting.kind
    value: Any
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            value = raw.lower() in ("true", "yes", "on", "1")
        else:
            raise ConfigError(f"{where}: {name} must be true or false, got {raw!r}")
    elif kind is int:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(f"{where}: {name} must be a whole number, got {raw!r}")
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{where}: {name} must be a whole number, got {raw!r}") from None
    elif kind is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ConfigError(f"{where}: {name} must be a number, got {raw!r}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{where}: {name} must be a number, got {raw!r}") from None
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: {name} must be a string, got {raw!r}")
        value = raw
    if setting.check is not None:
        problem = setting.check(value)
        if problem:
            raise ConfigError(
                f"{where}: {name} {problem}, got {raw!r}; fix it or remove it to use "
                f"the default ({setting.default!r})"
            )
    return value


def read_file(path: str) -> dict[str, Any]:
    """Read a TOML file into {name: raw value}; sections are only for readability.

    A setting may sit at the top or in any of the known sections; an unknown setting or
    section is refused, since it is most likely a typo that would otherwise go unnoticed.
    """
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; pass a TOML file with --config") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user; fix its permissions") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror}); pass a readable TOML file "
                          f"with --config") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"config file {path}: unknown section [{key}]; the sections are "
                                  f"{', '.join(f'[{s}]' for s in SECTIONS)} (see config/chatcluster.toml)")
            items = [(f"{key}.{name}" if isinstance(raw, dict) else name, raw) for name, raw in value.items()]
        else:
            items = [(key, value)]
        for name, raw in items:
            if name not in BY_NAME:
                kind = "section" if isinstance(raw, dict) else "setting"
                raise ConfigError(
                    f"config file {path}: unknown {kind} {name!r}; "
                    f"known settings are listed in config/chatcluster.toml"
                )
            flat[name] = raw
    return flat


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file at `path`, then `overrides` (already typed, from the CLI)."""
    values = {s.name: s.default for s in SETTINGS}
    where = {s.name: "the defaults" for s in SETTINGS}
    if path:
        for name, raw in read_file(path).items():
            values[name] = coerce(BY_NAME[name], raw, f"config file {path}")
            where[name] = f"config file {path}"
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = coerce(BY_NAME[name], raw, BY_NAME[name].flag)
            where[name] = BY_NAME[name].flag
    _check_multihost(values, where)
    cap = worker_cap(values["allow_many_workers"])
    if values["workers"] > cap:
        raise ConfigError(
            f"{where['workers']}: workers {values['workers']} is more than {cap}, the cap of "
            f"{worker_cap_text()}; choose fewer, or set allow_many_workers = true "
            f"(--allow-many-workers) to run up to {MAX_WORKERS}"
        )
    return Config(values=values, source=path or "defaults")


LOCATING = ("host", "port", "runtime_dir", "pid_file")  # what the commands need to find a running cluster


def load_locating(path: str | None, overrides: dict[str, Any] | None = None) -> Config:
    """Only what finds a running cluster (LOCATING), from a file that may not validate as a whole.

    For the commands that act on a running cluster (`status`, `stop`, `scale`): a file broken
    since the start (a typo in another setting, an unknown section) must not keep the operator
    from looking at the cluster or stopping it. Those settings themselves must still be valid,
    and the file must still be TOML: otherwise nothing says where the cluster is (ConfigError).
    """
    values = {s.name: s.default for s in SETTINGS}
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            read_file(path)  # raises the ConfigError naming the problem
            raise
        tables = [doc, *(v for v in doc.values() if isinstance(v, dict))]
        for table in tables:
            for name in LOCATING:
                if name in table and not isinstance(table[name], dict):
                    values[name] = coerce(BY_NAME[name], table[name], f"config file {path}")
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = coerce(BY_NAME[name], raw, BY_NAME[name].flag)
    return Config(values=values, source=path or "defaults")


def _check_multihost(values: dict[str, Any], where: dict[str, str]) -> None:
    """The NATS settings that only make sense together; node_name resolved (the hostname by default)."""
    if not values["nats_servers"]:
        return
    if not values["node_name"]:
        name = default_node_name()
        problem = name_problem(name)
        if problem:
            raise ConfigError(f"the host name {name!r} cannot be this host's node_name: it {problem}; "
                              f"choose one with --node-name")
        values["node_name"] = name
    pairs = (("nats_user", "nats_password_file", "the password of nats_user is read from nats_password_file; "
              "set both or neither"),
             ("nats_cert_file", "nats_key_file", "a client certificate needs its key; set nats_cert_file and "
              "nats_key_file together"))
    for a, b, why in pairs:
        if bool(values[a]) != bool(values[b]):
            given = a if values[a] else b
            raise ConfigError(f"{where[given]}: {given} is set but {b if given == a else a} is not: {why}")
    if values["nats_creds_file"] or values["nats_nkey_seed_file"]:
        try:
            import nkeys  # noqa: F401
        except ImportError:
            given = "nats_creds_file" if values["nats_creds_file"] else "nats_nkey_seed_file"
            raise ConfigError(f"{where[given]}: {given} needs the nkeys package, which is not installed; "
                              f"pip install nkeys") from None
    if values["history_db"]:
        raise ConfigError(f"{where['history_db']}: history_db keeps one host's history; with nats_servers the "
                          f"history comes from the stream (nats_max_age); remove one of the two")
    try:
        import nats  # noqa: F401
    except ImportError:
        raise ConfigError(f"{where['nats_servers']}: nats_servers needs the nats-py package, which is not "
                          f"installed; pip install 'chatcluster[nats]'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; None means 'not given', so the file's value stands."""
    for s in SETTINGS:
        if s.kind is bool:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{s.doc} (default: {str(s.default).lower()})")
        else:
            parser.add_argument(s.flag, dest=s.name, type=str, default=None, metavar=s.name.upper(),
                                help=f"{s.doc} (default: {s.default!r})")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {s.name: getattr(args, s.name, None) for s in SETTINGS}


def render_default_file() -> str:
    """The text of config/chatcluster.toml, generated so it can never drift from SETTINGS."""
    lines = [
        "# chatcluster configuration. Every setting is shown with its default.",
        "# Command-line flags (--name-with-dashes) override this file.",
        "# Settings marked (live) change on `chatcluster reload` (SIGHUP) without disconnecting anyone;",
        "# the others need a restart.",
    ]
    for section in dict.fromkeys(s.section for s in SETTINGS):
        lines += ["", f"[{section}]"]
        for s in SETTINGS:
            if s.section != section:
                continue
            lines.append(f"# {s.doc}{' (live)' if s.live else ''}")
            lines.append(f"{s.name} = {_toml_value(s.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def markdown_table() -> str:
    """The README's config reference."""
    rows = ["| setting | default | live | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.name}` (`{s.flag}`) | `{_toml_value(s.default)}` | {'yes' if s.live else 'no'} | {s.doc} |")
    return "\n".join(rows)
