"""Compare two JSON documents by shape: keys and value types, not values.

`shape_diff(real, sim)` lists every place where the simulator's answer differs
from the real server's: a key only one side has, or a value of another JSON
type. Numbers are one type (int and float alike); an empty list matches any list.
"""

from __future__ import annotations

from typing import Any


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def shape_diff(real: Any, sim: Any, path: str = "$") -> list[str]:
    """Differences as `path: what`; [] when the shapes agree."""
    real_kind, sim_kind = kind(real), kind(sim)
    if real_kind != sim_kind:
        return [f"{path}: real {real_kind}, sim {sim_kind}"]
    if real_kind == "object":
        out: list[str] = []
        for key in real.keys() - sim.keys():
            out.append(f"{path}.{key}: missing in sim (real {kind(real[key])})")
        for key in sim.keys() - real.keys():
            out.append(f"{path}.{key}: only in sim ({kind(sim[key])})")
        for key in real.keys() & sim.keys():
            out.extend(shape_diff(real[key], sim[key], f"{path}.{key}"))
        return sorted(out)
    if real_kind == "array" and real and sim:
        # Elements of one array share a shape: compare the first ones, then check
        # that each side is uniform (so a stray element cannot hide).
        out = shape_diff(real[0], sim[0], f"{path}[]")
        for side, items in (("real", real), ("sim", sim)):
            for item in items[1:]:
                if kind(item) != kind(items[0]):
                    out.append(f"{path}[]: {side} mixes {kind(items[0])} and {kind(item)}")
                    break
        return out
    return []


def length_diff(
    real: Any, sim: Any, path: str = "$", values: frozenset[str] = frozenset()
) -> list[str]:
    """Where two documents of the same shape hold lists of different lengths.

    For answers whose lengths are meant to agree (the same number of tokens, the
    same top-n): arrays are compared element by element, objects key by key.
    `values`: keys whose lists are values, not structure (a token's `bytes`).
    """
    if isinstance(real, list) and isinstance(sim, list):
        if len(real) != len(sim):
            return [f"{path}: real {len(real)} items, sim {len(sim)}"]
        out: list[str] = []
        for i, (a, b) in enumerate(zip(real, sim, strict=True)):
            out.extend(length_diff(a, b, f"{path}[{i}]", values))
        return out
    if isinstance(real, dict) and isinstance(sim, dict):
        out = []
        for key in sorted((real.keys() & sim.keys()) - values):
            out.extend(length_diff(real[key], sim[key], f"{path}.{key}", values))
        return out
    return []
