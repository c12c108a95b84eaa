"""Target names as brace patterns: the compact, exact way a .qpeft file lists its targets.

``encoder.layer.{0-5}.attention.self.{query,key,value}.weight`` stands for 18 names; the leftmost brace
varies slowest, and a range ``{a-b}`` counts up inclusively. :func:`compress_names` finds patterns whose
expansions are exactly the given names; :func:`expand_pattern` reverses it and refuses malformed or
oversized patterns cheaply (the reader calls it on untrusted files), raising :class:`PatternError`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

MAX_TARGETS = 1 << 16
INT = re.compile(r"0|[1-9][0-9]{0,18}")
NAME_PART = re.compile(r"[^{}:;,\s]+")
_RANGE_LIKE = re.compile(r"[0-9]+-[0-9]+")  # a name part that would read as a range inside braces


class PatternError(Exception):
    """A malformed or oversized target pattern."""


def _alternative_order(alt: str) -> tuple:
    return (0, int(alt), "") if INT.fullmatch(alt) else (1, 0, alt)


def _render_component(alts: tuple[str, ...]) -> str:
    if len(alts) == 1:
        return alts[0]
    pieces, i = [], 0
    while i < len(alts):
        j = i
        while (
            j + 1 < len(alts)
            and INT.fullmatch(alts[j])
            and INT.fullmatch(alts[j + 1])
            and int(alts[j + 1]) == int(alts[j]) + 1
        ):
            j += 1
        pieces.append(f"{alts[i]}-{alts[j]}" if j - i >= 2 else ",".join(alts[i : j + 1]))
        i = j + 1
    return "{" + ",".join(pieces) + "}"


def compress_names(names: Sequence[str]) -> list[str]:
    """Brace patterns whose expansions are exactly ``names`` (e.g. ``a.{0-5}.{query,key}.weight``)."""
    patterns = list(dict.fromkeys(tuple((c,) for c in name.split(".")) for name in names))
    changed = True
    while changed:
        changed = False
        for i in range(max((len(p) for p in patterns), default=0)):
            buckets: dict[tuple, list] = {}
            for p in patterns:
                key = (len(p), p[:i], p[i + 1 :]) if i < len(p) else (len(p), p, ())
                buckets.setdefault(key, []).append(p)
            patterns = []
            for group in buckets.values():
                if len(group) == 1 or any(_RANGE_LIKE.fullmatch(a) for p in group for a in p[i]):
                    patterns.extend(group)
                    continue
                alts = tuple(sorted({a for p in group for a in p[i]}, key=_alternative_order))
                patterns.append(group[0][:i] + (alts,) + group[0][i + 1 :])
                changed = True
    return [".".join(_render_component(c) for c in p) for p in patterns]


def _brace_choices(body: str) -> list[str | range]:
    choices: list[str | range] = []
    for alt in body.split(","):
        lo, dash, hi = alt.partition("-")
        if dash and INT.fullmatch(lo) and INT.fullmatch(hi):
            if int(hi) <= int(lo):
                raise PatternError(f"target pattern range {alt!r} is empty or reversed")
            choices.append(range(int(lo), int(hi) + 1))
        elif NAME_PART.fullmatch(alt):
            choices.append(alt)
        else:
            raise PatternError(f"target pattern alternative {alt!r} is malformed")
    return choices


def expand_pattern(pattern: str, limit: int = MAX_TARGETS) -> list[str]:
    """The names a brace pattern stands for, in order (leftmost brace varies slowest); at most ``limit``."""
    options: list[list[str | range]] = []
    for part in re.split(r"(\{[^{}]*\})", pattern):
        if part.startswith("{") and part.endswith("}"):
            options.append(_brace_choices(part[1:-1]))
        elif part and not NAME_PART.fullmatch(part):
            raise PatternError(f"target pattern {pattern[:80]!r} is malformed")
        elif part:
            options.append([part])
    if not options:
        raise PatternError("empty target pattern")
    total = 1
    for choice in options:
        total *= sum(c.stop - c.start if isinstance(c, range) else 1 for c in choice)
        if total > limit:
            raise PatternError(f"target patterns expand to more than {limit} targets")
    flat = [[str(x) for c in choice for x in (c if isinstance(c, range) else [c])] for choice in options]
    names = ["".join(combo) for combo in itertools.product(*flat)]
    if len(set(names)) != len(names):
        raise PatternError(f"target pattern {pattern[:80]!r} repeats a name")
    return names
