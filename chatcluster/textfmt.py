"""How chatcluster writes numbers for people: durations in /whois answers and in `chatcluster status`.

One format everywhere, so a user and an operator read the same "2m 5s". Pure.
"""

from __future__ import annotations


def duration(seconds: float) -> str:
    """`42s`, `2m 5s`, `3h 12m`, `4d 7h`: the two largest units, never a negative time."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"
