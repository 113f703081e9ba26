"""The multi-host files in deploy/: checked the way nats-server and systemd will read them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nats_support import make_tls_auth, nats_server_binary
from test_deploy_files import systemd_analyze

from chatcluster import config

REPO = Path(__file__).resolve().parent.parent
NATS_CONF = REPO / "deploy" / "nats" / "nats.conf"
NATS_UNIT = REPO / "deploy" / "nats" / "nats.service"
DROP_IN = REPO / "deploy" / "chatcluster-multihost.conf"
UNIT = REPO / "deploy" / "chatcluster.service"

pytestmark = pytest.mark.timeout(60)


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", "--man=no", str(path)], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})


def test_the_nats_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    binary, why = nats_server_binary()
    if binary is None:
        pytest.skip(why)
    pki = make_tls_auth(str(tmp_path / "pki"))
    text = (NATS_CONF.read_text().replace("/etc/nats/tls/server.pem", pki.server_cert)
            .replace("/etc/nats/tls/server-key.pem", pki.server_key).replace("/etc/nats/tls/ca.pem", pki.ca)
            .replace("/var/lib/nats", str(tmp_path / "store")))
    conf = tmp_path / "nats.conf"
    conf.write_text(text)
    env = {**os.environ, "ROUTE_PASSWORD": "r", "CHAT_PASSWORD": "c", "SYS_PASSWORD": "s"}
    result = subprocess.run([binary, "-t", "-c", str(conf)], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "sync_interval: always" in text and "verify: true" in text


def test_the_nats_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    binary, why = nats_server_binary()
    if binary is None:
        pytest.skip(why)
    # `verify` wants the ExecStart binary to exist: the copy runs the nats-server the tests use.
    local = tmp_path / "nats.service"
    local.write_text(NATS_UNIT.read_text().replace("/usr/local/bin/nats-server", binary))
    result = verify(local)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_chatcluster_drop_in_passes_systemd_analyze_verify_with_the_unit(tmp_path: Path) -> None:
    installed = shutil.which("chatcluster")
    command = installed if installed else f"{sys.executable} -m chatcluster"
    local = tmp_path / "chatcluster.service"
    local.write_text(UNIT.read_text().replace("/usr/local/bin/chatcluster", command))
    (tmp_path / "chatcluster.service.d").mkdir()
    shutil.copy(DROP_IN, tmp_path / "chatcluster.service.d" / "multihost.conf")
    result = verify(local)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_drop_in_hands_over_the_secrets_the_settings_read_from_files() -> None:
    text = DROP_IN.read_text()
    assert "LoadCredential=nats-password:" in text
    for name in ("nats_password_file", "nats_key_file"):
        assert name in config.BY_NAME and name in text


def test_a_stop_through_the_nats_unit_is_lame_duck_mode_and_ends_before_systemd_kills(tmp_path: Path) -> None:
    # systemd sends KillSignal= as soon as an ExecStop= command returns: lame duck mode started
    # by ExecStop= would be cut short by the signal that follows. The stop must be the signal itself.
    binary, why = nats_server_binary()
    if binary is None:
        pytest.skip(why)
    unit = dict(line.split("=", 1) for line in NATS_UNIT.read_text().splitlines() if "=" in line
                and not line.startswith("#"))
    assert "ExecStop" not in unit
    signame = unit["KillSignal"]
    timeout = float(unit["TimeoutStopSec"])
    # The node config's lame duck settings, on a standalone server (no routes, TLS or accounts).
    lame = [line for line in NATS_CONF.read_text().splitlines() if line.startswith("lame_duck_")]
    assert len(lame) == 2
    conf = tmp_path / "ldm.conf"
    conf.write_text("listen: 127.0.0.1:-1\n" + "\n".join(lame) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "Server is ready" in line:
                break
        proc.send_signal(getattr(signal, signame))
        rest = proc.communicate(timeout=timeout)[1]
        assert proc.returncode == 0, rest
        assert "Entering lame duck mode" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
