"""One typed config tree for a node, readable from a TOML file, `SWARM_NODE_*` env vars and CLI flags.

Precedence (lowest to highest): field defaults < config file < environment < command-line flags.
Every leaf field has a unique name across sections, so the flag is `--<field-name>` and the
environment variable is `SWARM_NODE_<FIELD_NAME>` whatever section it lives in. The docstring under
each field (pydantic `description`) is the reference documentation: `swarm-node config-doc` prints it.

Operator mistakes (unknown keys, bad values, contradicting fields) raise `ConfigError` with one
sentence that says what to change.
"""

from swarm_node.config.base import ConfigError
from swarm_node.config.learning import TaskConfig, TrainConfig
from swarm_node.config.merge import MergeConfig
from swarm_node.config.network import NetworkConfig
from swarm_node.config.node import SECTIONS, NodeConfig
from swarm_node.config.sources import (ENV_PREFIX, config_reference, flag_argv, flag_name, leaf_fields,
                                       load_config)

__all__ = ["ConfigError", "TaskConfig", "TrainConfig", "NetworkConfig", "MergeConfig", "NodeConfig", "SECTIONS",
           "ENV_PREFIX", "config_reference", "flag_argv", "flag_name", "leaf_fields", "load_config"]
