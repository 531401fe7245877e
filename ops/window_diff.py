"""What copying a recomputed window onto the output would change: new, same, or the
figures that differ. Pure: `ops.recompute` reads both topics and prints the verdicts.

A window's value is a pure function of its records (the contract), so equal bytes
mean nothing changes; otherwise the figures are compared field by field, counts keyed
by device type, locale or field as `device_counts[android]` (an absent key is 0 there,
as in the value itself, which lists non-zero counts only), and `top_ips` entry by entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

NEW = "new"
SAME = "same"
CHANGED = "changed"
# More differing figures than this in one window are summarised ("and N more"): a
# recomputation after a parsing fix changes most counts of every window.
MAX_SHOWN = 12


@dataclass(frozen=True)
class WindowChange:
    verdict: str  # NEW, SAME or CHANGED
    differences: list[str] = field(default_factory=list)  # "figure: old -> new", for CHANGED

    def describe(self) -> list[str]:
        """The verdict, then one indented line per differing figure."""
        head = {
            NEW: "new (not on the output yet)",
            SAME: "same (the output holds these bytes already)",
            CHANGED: f"changed ({len(self.differences)} figure(s))",
        }[self.verdict]
        shown = [f"    {line}" for line in self.differences[:MAX_SHOWN]]
        if len(self.differences) > MAX_SHOWN:
            shown.append(f"    ... and {len(self.differences) - MAX_SHOWN} more")
        return [head, *shown]


def compare(current: bytes | None, recomputed: bytes) -> WindowChange:
    """`current`: the output's latest value of the window (None: none)."""
    if current is None:
        return WindowChange(NEW)
    if current == recomputed:
        return WindowChange(SAME)
    try:
        old, new = json.loads(current), json.loads(recomputed)
    except ValueError:
        old = new = None
    if not isinstance(old, dict) or not isinstance(new, dict):
        return WindowChange(CHANGED, ["the value (not a JSON object on one side)"])
    differences = [line for name in _ordered_union(old, new) for line in _figure(name, old.get(name), new.get(name))]
    # Equal figures in other bytes (key order, spacing: an older release's rendering).
    return WindowChange(CHANGED, differences or ["the bytes only (the same figures, written differently)"])


def _ordered_union(old: dict, new: dict) -> list[str]:
    return [*old, *(name for name in new if name not in old)]


def _figure(name: str, old: object, new: object) -> list[str]:
    if old == new:
        return []
    if isinstance(old, dict | None) and isinstance(new, dict | None) and (old or new):
        return _counts(name, old or {}, new or {})
    if name == "top_ips" and isinstance(old, list) and isinstance(new, list):
        return [f"top_ips: {_ips(old)} -> {_ips(new)}"]
    return [f"{name}: {_shown(old)} -> {_shown(new)}"]


def _counts(name: str, old: dict, new: dict) -> list[str]:
    """Keyed counts (one level, or two for app_version_by_device); absent is 0."""
    lines = []
    for key in _ordered_union(old, new):
        before, after = old.get(key, 0), new.get(key, 0)
        if before == after:
            continue
        if isinstance(before, dict) or isinstance(after, dict):
            lines += _counts(f"{name}[{key}]", _as_counts(before), _as_counts(after))
        else:
            lines.append(f"{name}[{key}]: {_shown(before)} -> {_shown(after)}")
    return lines


def _as_counts(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _ips(entries: list) -> str:
    try:
        return "[" + ", ".join(f"{entry['ip']} {entry['count']}" for entry in entries) + "]"
    except (TypeError, KeyError):
        return _shown(entries)


def _shown(value: object) -> str:
    return "(none)" if value is None else json.dumps(value, ensure_ascii=False)
