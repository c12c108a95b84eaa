"""JSON from untrusted files and requests: duplicate keys, NaN/Infinity and pathological nesting are refused."""

from __future__ import annotations

import json


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: str | bytes) -> object:
    """json.loads that refuses duplicate keys, NaN/Infinity and pathological nesting (raises ValueError)."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
