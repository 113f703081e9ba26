"""The files in deploy/ are what operators install: check them the way systemd and the kernel will."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatcluster import cli, config, paths, supervisor

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "chatcluster.service"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
SYSCTL = REPO / "deploy" / "sysctl.conf"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

SHIPPED_EXEC_START = "/usr/local/bin/chatcluster start --config /etc/chatcluster/chatcluster.toml"
# Default graceful_timeout in seconds; the unit's TimeoutStopSec must leave room beyond it.
GRACEFUL_TIMEOUT = config.BY_NAME["graceful_timeout"].default
# `systemd-analyze security` rates 0.0-10.0; up to 3.0 is "OK" (lower is better).
MAX_EXPOSURE = 3.0

pytestmark = pytest.mark.timeout(60)


def unit_directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a unit file as {"Section.Key": [values...]}, in order."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def sysctl_settings(text: str) -> list[tuple[int, str, str]]:
    """(line index, key, value) of every setting in a sysctl.conf."""
    settings = []
    for index, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.append((index, key.strip(), value.strip()))
    return settings


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)")
    return path


def systemd_version(analyze: str) -> int:
    first_line = subprocess.run(
        [analyze, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    match = re.match(r"systemd (\d+)", first_line)
    assert match, f"unexpected `systemd-analyze --version` output: {first_line!r}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return unit_directives(UNIT.read_text())


# --- the unit, line by line ---------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("Service.Type", "notify"),
        ("Service.ExecStart", SHIPPED_EXEC_START),
        ("Service.KillMode", "mixed"),
        ("Service.KillSignal", "SIGTERM"),
        ("Service.Restart", "on-failure"),
        ("Service.RuntimeDirectory", "chatcluster"),
        ("Service.RuntimeDirectoryMode", "0700"),
        ("Service.UMask", "0077"),
        ("Service.DynamicUser", "yes"),
        ("Service.NoNewPrivileges", "yes"),
        ("Service.ProtectSystem", "strict"),
        ("Service.ProtectHome", "yes"),
        ("Service.PrivateTmp", "yes"),
        ("Service.PrivateDevices", "yes"),
        ("Service.RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("Service.CapabilityBoundingSet", ""),
        ("Service.MemoryDenyWriteExecute", "yes"),
        ("Install.WantedBy", "multi-user.target"),
    ],
)
def test_unit_sets(unit: dict[str, list[str]], key: str, value: str) -> None:
    assert unit.get(key) == [value]


def test_unit_allows_only_the_system_service_syscall_set(unit: dict[str, list[str]]) -> None:
    assert unit["Service.SystemCallFilter"][0] == "@system-service"


def test_unit_reloads_by_sending_hup_to_the_main_process(unit: dict[str, list[str]]) -> None:
    (reload_command,) = unit["Service.ExecReload"]
    assert "-HUP" in reload_command.split()
    assert "$MAINPID" in reload_command


def test_unit_takes_notifications_from_the_supervisor_alone(unit: dict[str, list[str]]) -> None:
    # The supervisor is the main process for the unit's whole life (an upgrade re-executes
    # it in place), and no other process notifies: nothing else needs to be trusted.
    assert unit["Service.NotifyAccess"] == ["main"]


def test_unit_stop_timeout_exceeds_graceful_timeout(unit: dict[str, list[str]]) -> None:
    assert int(unit["Service.TimeoutStopSec"][0]) > GRACEFUL_TIMEOUT


def test_unit_has_a_watchdog(unit: dict[str, list[str]]) -> None:
    assert int(unit["Service.WatchdogSec"][0]) > 0


def test_unit_raises_the_descriptor_limit_for_100k_clients(unit: dict[str, list[str]]) -> None:
    assert int(unit["Service.LimitNOFILE"][0]) >= 100_000


# --- the unit, as systemd reads it -------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    # `verify` insists that the ExecStart binary exists, and the shipped unit names
    # /usr/local/bin/chatcluster, which a development checkout does not have. So the
    # copy verified here runs the chatcluster this interpreter would run (the
    # installed console script, else `python -m chatcluster`); every other line is
    # verified exactly as shipped.
    installed = shutil.which("chatcluster")
    command = installed if installed else f"{sys.executable} -m chatcluster"
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC_START}\n") == 1
    local = tmp_path / UNIT.name
    local.write_text(
        text.replace(
            f"ExecStart={SHIPPED_EXEC_START}",
            f"ExecStart={command} start --config /etc/chatcluster/chatcluster.toml",
        )
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(local)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )
    assert result.stderr == ""
    assert result.returncode == 0


def test_unit_security_exposure_is_ok() -> None:
    analyze = systemd_analyze()
    if systemd_version(analyze) < 250:
        pytest.skip("`systemd-analyze security --offline` needs systemd 250 or later")
    # --offline reads the file alone; the binary need not exist.
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, f"no overall exposure level in:\n{result.stdout}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} {match.group(2)}:\n{result.stdout}"


# --- Dockerfile ---------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for word, args in dockerfile_instructions() if word == "USER"]
    assert users, "no USER instruction: the container would run as root"
    name = users[-1].split(":")[0]
    assert name not in ("root", "0")


def test_dockerfile_exposes_the_default_port() -> None:
    exposed = [args.split() for word, args in dockerfile_instructions() if word == "EXPOSE"]
    assert any("12345" in ports or "12345/tcp" in ports for ports in exposed)


def test_dockerfile_entry_point_starts_chatcluster() -> None:
    instructions = dockerfile_instructions()
    (entrypoint,) = [args for word, args in instructions if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["chatcluster", "start"]
    (cmd,) = [args for word, args in instructions if word == "CMD"]
    assert json.loads(cmd) == ["--config", "/etc/chatcluster/chatcluster.toml"]


def test_dockerfile_ships_the_config_it_points_at() -> None:
    copies = [args.split() for word, args in dockerfile_instructions() if word == "COPY"]
    assert ["config/chatcluster.toml", "/etc/chatcluster/chatcluster.toml"] in copies
    assert (REPO / "config" / "chatcluster.toml").is_file()


def test_dockerfile_stops_with_sigterm_on_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    assert ("STOPSIGNAL", "SIGTERM") in instructions
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)


# --- sysctl.conf --------------------------------------------------------------


@pytest.mark.parametrize("key", ["net.core.somaxconn", "net.ipv4.tcp_migrate_req", "fs.file-max"])
def test_sysctl_sets(key: str) -> None:
    assert key in [k for _, k, _ in sysctl_settings(SYSCTL.read_text())]


def test_every_sysctl_setting_is_preceded_by_a_comment_saying_why() -> None:
    lines = SYSCTL.read_text().splitlines()
    for index, key, _ in sysctl_settings(SYSCTL.read_text()):
        assert index > 0 and lines[index - 1].lstrip().startswith("#"), f"{key} has no comment line"


def test_sysctl_migrates_queued_connections_between_reuseport_listeners() -> None:
    assert ("net.ipv4.tcp_migrate_req", "1") in [(k, v) for _, k, v in sysctl_settings(SYSCTL.read_text())]


def test_sysctl_nr_open_admits_the_units_descriptor_limit(unit: dict[str, list[str]]) -> None:
    settings = {k: v for _, k, v in sysctl_settings(SYSCTL.read_text())}
    assert int(settings["fs.nr_open"]) >= int(unit["Service.LimitNOFILE"][0])


@pytest.mark.parametrize("key", [k for _, k, _ in sysctl_settings(SYSCTL.read_text())])
def test_sysctl_key_exists_in_this_kernel(key: str) -> None:
    proc_sys = Path("/proc/sys")
    if not proc_sys.is_dir():
        pytest.skip("no /proc/sys to check keys against")
    path = proc_sys.joinpath(*key.split("."))
    if not path.exists() and key == "net.ipv4.tcp_migrate_req":
        major, minor = (int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
        if (major, minor) < (5, 14):
            pytest.skip("net.ipv4.tcp_migrate_req needs Linux 5.14 or later")
    assert path.exists(), f"{key} is not a sysctl of this kernel ({path} missing)"


# --- docs ---------------------------------------------------------------------


def test_deploy_doc_keeps_the_upgrade_section() -> None:
    assert "\n## Upgrading without dropping connections\n" in DEPLOY_DOC.read_text()


def doc_commands() -> list[list[str]]:
    """Every `chatcluster SUBCOMMAND ...` invocation shown in docs/deploy.md, as argv after the program."""
    found: dict[str, list[str]] = {}
    pattern = r"chatcluster ((?:start|status|stop|reload|scale|upgrade)\b[^`\n|#]*)"
    for m in re.finditer(pattern, DEPLOY_DOC.read_text()):
        words = [w if w != "N" else "2" for w in m.group(1).replace("[", "").replace("]", "").split()]
        found[" ".join(words)] = words
    return list(found.values())


@pytest.mark.parametrize("argv", doc_commands(), ids=" ".join)
def test_every_command_in_the_deploy_doc_parses(argv: list[str]) -> None:
    cli.build_parser().parse_args(argv)


def test_the_units_exec_start_parses() -> None:
    argv = SHIPPED_EXEC_START.split()[1:]
    args = cli.build_parser().parse_args(argv)
    assert args.command == "start" and args.config == "/etc/chatcluster/chatcluster.toml"


def test_every_signal_in_the_deploy_doc_is_handled_by_the_supervisor() -> None:
    table = [line for line in DEPLOY_DOC.read_text().splitlines() if line.startswith("| ")]
    signals = set(re.findall(r"`([A-Z0-9]+)`", " ".join(line.rsplit("|", 2)[-2] for line in table)))
    assert signals == {"HUP", "TERM", "INT", "QUIT", "TTIN", "TTOU", "USR1", "USR2"}
    assert signals <= set(supervisor.HANDLED)


def test_the_deploy_docs_status_example_has_the_columns_status_prints() -> None:
    heads = " ".join(head for _, head in cli.STATUS_COLUMNS)
    assert re.search(r"^" + r"\s+".join(heads.split()) + "$", DEPLOY_DOC.read_text(), re.M)


def test_docker_image_points_the_commands_at_the_runtime_directory_it_creates() -> None:
    instructions = dockerfile_instructions()
    env = " ".join(args for word, args in instructions if word == "ENV")
    (runtime_dir,) = re.findall(r"RUNTIME_DIRECTORY=(\S+)", env)
    runs = " ".join(args for word, args in instructions if word == "RUN")
    assert re.search(rf"install -d -m 0700 -o chatcluster -g chatcluster {re.escape(runtime_dir)}\b", runs)
    cfg = config.load(None)
    assert paths.resolve_runtime_dir(cfg, {"RUNTIME_DIRECTORY": runtime_dir}) == runtime_dir


def test_the_units_runtime_directory_is_the_one_the_docs_name(unit: dict[str, list[str]]) -> None:
    (name,) = unit["Service.RuntimeDirectory"]
    assert f"--runtime-dir /run/{name}" in DEPLOY_DOC.read_text()
