"""The settings one worker runs with, held in one place that a live reload updates.

The worker, its chat core and the code that makes each client's line reader
and flood-control bucket all read the same `LiveSettings` object, so a reload
changes a value once and everyone sees it; there is no copy to forget and no
class-level global. Values are plain instance attributes (copied from the
validated `Config`), so reading one on the hot path costs a dict lookup. This
module also reads RUNTIME_DIR/config.json, where the supervisor writes the
running configuration for the workers to apply on HUP. No sockets.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .config import Config

LIVE_CONFIG = "config.json"


class LiveSettings:
    """Every setting as an attribute (`settings.max_sendq_bytes`), and the Config they came from."""

    cfg: Config

    def __init__(self, cfg: Config) -> None:
        self.replace(cfg)

    def replace(self, cfg: Config) -> None:
        self.cfg = cfg
        vars(self).update(cfg.values)

    def reload(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Apply the live ones among `values`; returns them (the others need a restart)."""
        new = Config(values={**self.cfg.values, **values}, source=source)
        live, _restart = self.cfg.live_changes(new)
        self.replace(Config(values={**self.cfg.values, **live}, source=source))
        return live

    def __getattr__(self, name: str) -> Any:
        # Only reached for a name that is not a setting: say so plainly.
        raise AttributeError(f"no setting named {name!r}")


def read_live_config(runtime_dir: str) -> tuple[dict[str, Any], int, str]:
    """(values, version, path) of the running configuration the supervisor wrote; OSError/ValueError if unreadable."""
    path = os.path.join(runtime_dir, LIVE_CONFIG)
    with open(path) as fh:
        doc = json.load(fh)
    try:
        values, version = doc["values"], int(doc["version"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a running configuration ({exc!r})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: 'values' is not a table")
    return values, version, path
