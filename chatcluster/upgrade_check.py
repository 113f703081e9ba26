"""The check an upgrade runs in a child interpreter on the installed code, before anything changes.

`python -c` runs `main(state_path)` with the import path the supervisor would
get on exec (see `upgrade.spawn_check`). Importing every module is the first
part of the check, so this module imports them all, and for that reason no
module imports it: it sits at the top of the import graph. Then it reads the
running supervisor's state, loads the configuration and checks that this code
can take over the running cluster in place. Its output goes to
RUNTIME_DIR/upgrade-check.log, whose last line the supervisor reports.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

# Importing is the test: code that raises at import must fail here, not in the supervisor.
from . import (  # noqa: F401
    backpressure,
    broker,
    bus,
    chat,
    cli,
    client,
    config,
    directory,
    dispatch,
    events,
    exporter,
    handoff,
    histdb,
    history,
    metrics,
    migrate,
    output,
    paths,
    procs,
    protocol,
    registry,
    roles,
    rooms,
    roster,
    sdnotify,
    settings,
    shedding,
    snapshot,
    stopping,
    supervisor,
    telnet,
    textfmt,
    upgrade,
    wire,
    worker,
)
from . import stats as S


def main(state_path: str) -> int:
    """0 if the installed code can run this cluster; otherwise say why on stderr and return 2.

    An import that raises is the most common failure; it ends this process with its
    traceback before `main` runs.
    """
    try:
        with open(state_path) as fh:
            state = upgrade.parse_state(json.load(fh))
    except (OSError, ValueError) as exc:
        print(f"the installed code cannot read the running supervisor's state: {exc}", file=sys.stderr)
        return 2
    try:
        config.load(state["config_path"], state["overrides"])
    except config.ConfigError as exc:
        print(f"the configuration does not load with the installed code: {exc}", file=sys.stderr)
        return 2
    problem = incompatibility(state)
    if problem:
        print(f"the installed code cannot take over this cluster in place: {problem}; restart the cluster "
              f"to move to it", file=sys.stderr)
        return 2
    return 0


def incompatibility(state: dict[str, Any]) -> str | None:
    """What an upgrade cannot bridge. The broker and the stats file stay in use."""
    if state.get("bus_wire") != wire.WIRE_VERSION:
        return (f"it speaks bus wire version {wire.WIRE_VERSION}, the running broker {state.get('bus_wire')} "
                f"(an upgrade keeps the broker)")
    try:
        S.StatsFile(os.path.join(state["runtime_dir"], "stats")).close()
    except (OSError, ValueError) as exc:
        return f"the running workers' stats file is not one it can use ({exc})"
    return None
