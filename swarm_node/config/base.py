"""The base of every config section and the operator error of the config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from swarm_node.errors import OperatorError


class ConfigError(OperatorError):
    """An operator mistake in the configuration; the message says how to fix it."""


class Section(BaseModel):
    """A config section: unknown keys and invalid assignments are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

