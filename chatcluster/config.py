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
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A setting is wrong; the message names the problem and how to fix it."""


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
    if "{nick}" not in value:
        return "must contain {nick}, where the client's nickname goes"
    if "\n" in value or "\r" in value:
        return "must be a single line"
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "0.0.0.0", str, "Address the workers listen on."),
    Setting("port", 12345, int, "TCP port shared by all workers (SO_REUSEPORT).", check=_between(1, 65535)),
    Setting("workers", 0, int, "Number of worker processes; 0 means one per CPU.", check=_between(0, 1024)),
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
        0,
        int,
        "Most clients from one address across the cluster; 0 means no limit.",
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
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


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
        return self.values["workers"] or (os.cpu_count() or 1)

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
    """Read a TOML file into {name: raw value}; sections are only for readability."""
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing file with --config") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable by this user; fix its permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, raw in items:
            if name not in BY_NAME:
                raise ConfigError(
                    f"config file {path}: unknown setting {name!r}; "
                    f"known settings are listed in config/chatcluster.toml"
                )
            flat[name] = raw
    return flat


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file at `path`, then `overrides` (already typed, from the CLI)."""
    values = {s.name: s.default for s in SETTINGS}
    if path:
        for name, raw in read_file(path).items():
            values[name] = coerce(BY_NAME[name], raw, f"config file {path}")
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = coerce(BY_NAME[name], raw, BY_NAME[name].flag)
    return Config(values=values, source=path or "defaults")


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
