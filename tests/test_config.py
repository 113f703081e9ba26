"""Settings: one declaration, every value checked, every error naming the fix."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import free_port, start_refused

from chatcluster import config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_match_the_documented_ones() -> None:
    cfg = config.load()
    assert cfg.port == 12345
    assert cfg.max_line_bytes == 512
    assert cfg.max_sendq_bytes == 1 << 20
    assert cfg.flood_burst == 10 and cfg.flood_rate == 5.0
    assert cfg.announce_joins is True
    assert cfg.graceful_timeout == 10.0 and cfg.worker_timeout == 30.0


def test_shipped_config_file_is_generated_from_the_declarations() -> None:
    assert (REPO / "config" / "chatcluster.toml").read_text() == config.render_default_file()


def test_shipped_config_file_loads_to_the_defaults() -> None:
    cfg = config.load(str(REPO / "config" / "chatcluster.toml"))
    assert cfg.values == config.load().values


def test_readme_config_reference_is_generated_from_the_declarations() -> None:
    assert config.markdown_table() in (REPO / "README.md").read_text()


def test_file_values_are_read_from_any_section(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[limits]\nmax_line_bytes = 100\n[server]\nport = 2000\n"))
    assert cfg.max_line_bytes == 100 and cfg.port == 2000


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "port = 2000\n"), {"port": "3000"})
    assert cfg.port == 3000


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port = 70000\n", "port must be between 1 and 65535"),
        ("port = 'abc'\n", "port must be a whole number"),
        ("announce_joins = 'maybe'\n", "announce_joins must be true or false"),
        ("flood_rate = -1\n", "flood_rate must be between 0"),
        ("welcome = 'hi'\n", "welcome must contain {nick}"),
        ("log_level = 'loud'\n", "log_level must be one of"),
        ("colour = 'red'\n", "unknown setting 'colour'"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_bad_values_name_the_setting_and_the_fix(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    assert fragment in str(err.value)
    assert str(tmp_path / "c.toml") in str(err.value)


def test_missing_file_names_the_path() -> None:
    with pytest.raises(config.ConfigError, match="does not exist; pass an existing file with --config"):
        config.load("/nonexistent/chatcluster.toml")


def test_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(config.ConfigError, match="--max-line-bytes: max_line_bytes must be a whole number"):
        config.load(None, {"max_line_bytes": "lots"})


def test_live_changes_are_split_from_restart_changes() -> None:
    old = config.load()
    new = config.load(None, {"welcome": "hi {nick}", "port": "4000"})
    live, restart = old.live_changes(new)
    assert live == {"welcome": "hi {nick}"}
    assert restart == ["port"]


def test_start_with_a_bad_value_exits_with_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path, "max_sendq_bytes = 'huge'\n")
    r = subprocess.run([sys.executable, "-m", "chatcluster", "start", "--config", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "max_sendq_bytes must be a whole number" in lines[0]


def test_unknown_option_exits_non_zero() -> None:
    r = subprocess.run([sys.executable, "-m", "chatcluster", "start", "--no-such-thing"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-thing" in r.stderr


# --- files that are not config files, and what they may contain -------------------------------


def start_with(*args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="cc-") as runtime_dir:
        return start_refused("--host", "127.0.0.1", "--port", str(free_port()), "--runtime-dir", runtime_dir, *args)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("chatcluster: error: config file "), lines[0]
    return lines[0]


def test_a_directory_given_as_config_file_is_a_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(start_with("--config", str(tmp_path)))
    assert line == f"chatcluster: error: config file {tmp_path} is a directory; pass a TOML file with --config"


def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('welcome = "*** Grüß dich {nick}"\n'.encode("latin-1"))
    line = one_line_error(start_with("--config", str(path)))
    assert line == (f"chatcluster: error: config file {path} is not UTF-8 text (byte 0xfc at offset 17); "
                    f"save it as UTF-8")


def test_a_config_file_that_is_not_toml_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "chatcluster.json"
    path.write_text('{"port": 2000}\n')
    line = one_line_error(start_with("--config", str(path)))
    assert f"config file {path} is not valid TOML (" in line and line.endswith("; fix the syntax")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[extra]\n", "unknown section [extra]; the sections are [server], [chat], [limits], [processes]"),
        ("[extra]\nport = 2000\n", "unknown section [extra]"),
        ("[server.tls]\ncert = 'x'\n", "unknown section 'server.tls'"),
        ("[limits]\nmax_lines_bytes = 100\n", "unknown setting 'max_lines_bytes'"),
    ],
)
def test_unknown_sections_and_settings_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    assert fragment in str(err.value)
    assert str(tmp_path / "c.toml") in str(err.value)


def test_start_with_an_unknown_section_exits_2_naming_it(tmp_path: Path) -> None:
    line = one_line_error(start_with("--config", write(tmp_path, "[server]\nport = 2000\n[extra]\ncolour = 1\n")))
    assert "unknown section [extra]" in line


@pytest.mark.parametrize(
    ("welcome", "fragment"),
    [
        ("*** Welcome {nick}! Rules: {}", "has the replacement field {}, but {nick} is the only one allowed"),
        ("*** Welcome {nick}, {x}", "has the replacement field {x}, but {nick} is the only one allowed"),
        ("*** Welcome {nick} :-}", "cannot be formatted (Single '}' encountered in format string)"),
        ("*** Welcome {nick:>999999999}", "has the replacement field {nick:>999999999}"),
        ("*** Welcome {nick.upper}", "has the replacement field {nick.upper}"),
        ("*** Welcome {{nick}}", "must contain {nick}"),
    ],
)
def test_a_welcome_that_cannot_be_formatted_is_refused(tmp_path: Path, welcome: str, fragment: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(None, {"welcome": welcome})
    assert str(err.value).startswith(f"--welcome: welcome {fragment}")


def test_a_welcome_with_literal_braces_is_accepted() -> None:
    cfg = config.load(None, {"welcome": "{{*}} Welcome {nick} {{*}}"})
    assert cfg.welcome.format(nick="ab") == "{*} Welcome ab {*}"


@pytest.mark.parametrize("welcome", ["*** Welcome {nick}! Rules: {}", "*** Hi {nick} {x}", "*** Hi {nick} }"])
def test_start_with_a_welcome_that_cannot_be_formatted_exits_2(welcome: str) -> None:
    result = start_with("--workers", "1", "--welcome", welcome)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chatcluster: error: --welcome: welcome "), result.stderr


def test_workers_are_capped_per_cpu_unless_allowed() -> None:
    cap = config.WORKERS_PER_CPU * config.usable_cpus()
    if cap >= config.MAX_WORKERS:
        pytest.skip("this machine has so many CPUs that the cap is the absolute maximum")
    assert config.load(None, {"workers": str(cap)}).workers == cap
    with pytest.raises(config.ConfigError) as err:
        config.load(None, {"workers": str(cap + 1)})
    assert str(err.value) == (
        f"--workers: workers {cap + 1} is more than {cap}, the cap of {config.worker_cap_text()}; choose fewer, "
        f"or set allow_many_workers = true (--allow-many-workers) to run up to {config.MAX_WORKERS}")
    assert config.load(None, {"workers": str(cap + 1), "allow_many_workers": True}).workers == cap + 1


# -- several hosts -------------------------------------------------------------------------------


def test_nats_servers_are_split_at_commas_and_node_name_defaults_to_the_host_name(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="nats_servers needs nats-py")
    cfg = config.load(None, {"nats_servers": " nats://n1:4222 ,tls://n2:4222,, "})
    assert config.nats_urls(cfg.nats_servers) == ("nats://n1:4222", "tls://n2:4222")
    assert cfg.node_name == config.default_node_name().split(".")[0] and cfg.node_name
    named = config.load(write(tmp_path, "nats_servers = 'nats://n1:4222'\nnode_name = 'web-1'\n"))
    assert named.node_name == "web-1"
    assert config.load(None).node_name == ""  # one host: no node name needed


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"nats_servers": "http://n1:4222"}, "which is not of the form nats://HOST:PORT or tls://HOST:PORT"),
        ({"nats_servers": "nats://"}, "which is not of the form"),
        ({"nats_servers": "nats://n1:4222", "node_name": "web.1"}, "may only hold A-Z a-z 0-9 _ and -"),
        ({"nats_servers": "nats://n1:4222", "nats_user": "chat"},
         "nats_user is set but nats_password_file is not"),
        ({"nats_servers": "nats://n1:4222", "nats_key_file": "__FILE__"},
         "nats_key_file is set but nats_cert_file is not"),
        ({"nats_servers": "nats://n1:4222", "history_db": "__DIR__/h.db"},
         "with nats_servers the history comes from the stream"),
        ({"nats_servers": "nats://n1:4222", "nats_replicas": "2"}, "must be 1, 3 or 5"),
    ],
)
def test_multi_host_settings_that_do_not_fit_together_are_refused(tmp_path: Path, values: dict[str, str],
                                                                  fragment: str) -> None:
    pytest.importorskip("nats", reason="nats_servers needs nats-py")
    key = tmp_path / "key.pem"
    key.write_text("not checked here\n")
    key.chmod(0o600)
    given = {k: v.replace("__FILE__", str(key)).replace("__DIR__", str(tmp_path)) for k, v in values.items()}
    with pytest.raises(config.ConfigError) as err:
        config.load(None, given)
    assert fragment in str(err.value)
