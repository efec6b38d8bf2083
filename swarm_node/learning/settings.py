"""Small settings types for the inner layers, filled from the node's config at the edge.

Modules under `learning/` and `network/` never import the node's config module: each declares the few settings it
reads as a frozen dataclass of its own (e.g. `learning.trainer.TrainerSettings`,
`network.collector.CollectorSettings`). The node builds them with `pick`, which reads each field by name from
the config sections it is given, so a field keeps the name (and docstring) of its setting in the node config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def pick(cls: type[T], *sections: Any) -> T:
    """An instance of dataclass `cls` whose fields are read by name from the first of `sections` that has them.

    Raises:
        AttributeError: no section has one of `cls`'s fields (a field without a default).
    """
    if isinstance(sections[0] if len(sections) == 1 else None, cls):
        return sections[0]
    values = {}
    for field in dataclasses.fields(cls):
        source = next((s for s in sections if hasattr(s, field.name)), None)
        if source is not None:
            values[field.name] = getattr(source, field.name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise AttributeError(f"no section given to {cls.__name__} has the setting {field.name!r}")
    return cls(**values)
