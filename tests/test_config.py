"""Settings: one declaration, every value checked, every error naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
