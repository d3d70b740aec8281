"""Refuse config keys the schema does not know.

Hydra's `+key=value` adds a key even to a structured config, and `OmegaConf.to_object` then
drops it without a word: `+optim.learning_rate=1e-5` would train at the default rate and
`+paralel=tp` would run plain FSDP. `check_known_keys` walks the composed config beside its
dataclass schema before that conversion and names the first unknown key, with the nearest
valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def unknown_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the valid keys beside it) of every key of `cfg` that its schema lacks.

    A node typed by a dataclass allows that dataclass's fields; a dict node (e.g.
    `data.sources`, whose keys are the user's names) allows any key, and its values are
    checked against their own types.
    """
    found: list[tuple[str, list[str]]] = []
    if isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            child = cfg._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                found += unknown_keys(child, f"{prefix}[{i}]")
        return found
    schema = OmegaConf.get_type(cfg)
    allowed = (
        [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    )
    for key in cfg.keys():
        name = f"{prefix}.{key}" if prefix else str(key)
        if allowed is not None and key not in allowed:
            found.append((name, allowed))
            continue
        child = cfg._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not (
            child._is_none() or child._is_missing() or child._is_interpolation()
        ):
            found += unknown_keys(child, name)
    return found


def nearest_key(key: str, allowed: list[str]) -> str | None:
    """The valid key closest to `key`: one spelled by its words' initials (learning_rate:
    lr), else difflib's closest."""
    initials = "".join(word[:1] for word in key.split("_"))
    if len(initials) > 1 and initials in allowed:
        return initials
    nearest = difflib.get_close_matches(key, allowed, n=1, cutoff=0.0)
    return nearest[0] if nearest else None


def check_known_keys(cfg: DictConfig) -> None:
    """ValueError naming each key of the composed `cfg` that is not in its schema."""
    found = unknown_keys(cfg)
    if not found:
        return
    lines = []
    for name, allowed in found:
        parent, _, key = name.rpartition(".")
        where = f"{parent}." if parent else ""
        nearest = nearest_key(key, allowed)
        hint = f"; did you mean {where}{nearest}?" if nearest else ""
        lines.append(
            f"{name} is not a config key{hint} (keys of {parent or 'the job'}: "
            f"{', '.join(allowed)})"
        )
    raise ValueError(
        "; ".join(lines) + ". A key given with + is added, never checked, and would be ignored"
    )


def to_typed_config(cfg: Any) -> Any:
    """A composed Hydra config as its typed dataclasses, after `check_known_keys`; a config
    that is typed already is returned as it is."""
    if not isinstance(cfg, DictConfig):
        return cfg
    check_known_keys(cfg)
    return OmegaConf.to_object(cfg)


__all__ = ["check_known_keys", "nearest_key", "to_typed_config", "unknown_keys"]
