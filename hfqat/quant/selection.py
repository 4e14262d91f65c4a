"""Which modules a user's names and patterns select: the skip list (`modules_to_not_convert`) and `layer_bits` keys.

One place for the matching rules, so that conversion, bit resolution and the "this pattern matched nothing" warning
agree. A pattern that selects no module is almost always a typo (``layer_bits={"down_prj": 8}``); it is reported with
the closest module names instead of being ignored.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterable


def names_module(key: str, name: str) -> bool:
    """Whether the plain name `key` names module `name`: the full name or a dotted suffix of it."""
    return name == key or name.endswith("." + key)


def skip_matches(key: str, name: str) -> bool:
    """Whether skip-list entry `key` covers module `name`: the module itself or a parent module of it."""
    return names_module(key, name) or name.startswith(key + ".")


def layer_bits_matches(pattern: str, name: str) -> bool:
    """Whether `layer_bits` key `pattern` selects module `name`: a plain (suffix) name or a full regex match."""
    return names_module(pattern, name) or re.fullmatch(pattern, name) is not None


def is_skipped(name: str, modules_to_not_convert: Iterable[str]) -> bool:
    return any(skip_matches(key, name) for key in modules_to_not_convert)


def closest_names(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The module names (or name tails of as many dotted parts as `pattern`) most like `pattern`: ``down_prj`` ->
    ``down_proj``, ``model.layers.0.mlp.down_prj`` -> ``model.layers.0.mlp.down_proj``."""
    parts = pattern.count(".") + 1
    tails = dict.fromkeys(".".join(name.split(".")[-parts:]) for name in names)
    return difflib.get_close_matches(pattern, list(tails), n=n, cutoff=0.6)


def warn_unmatched(field: str, patterns: Iterable[str], names: list[str], matches) -> list[str]:
    """Warn once for every pattern of `field` that `matches(pattern, name)` finds in none of `names`; returns them."""
    unmatched = [p for p in patterns if not any(matches(p, name) for name in names)]
    for pattern in unmatched:
        close = closest_names(pattern, names)
        hint = f"closest module names: {close}" if close else f"module names look like {names[:3]}"
        warnings.warn(f"QATConfig.{field} entry {pattern!r} matches no module of this model, so it has no effect; "
                      f"{hint}", UserWarning, stacklevel=3)
    return unmatched


def skip_list(defaults: Iterable[str], user: Iterable[str] | None, layer_bits: dict[str, int] | None) -> list[str]:
    """The modules kept float: the `defaults` (the output head, tied embeddings) plus the user's entries.

    A default entry is converted after all when a `layer_bits` key names it by plain name (``{"lm_head": 8}``);
    a regex catching everything (``".*"``) does not, so the head never becomes low-bit by accident.
    """
    named = [key for key in (layer_bits or {})]
    kept = [d for d in defaults if not any(names_module(key, d) for key in named)]
    return list(dict.fromkeys([*kept, *(user or [])]))
