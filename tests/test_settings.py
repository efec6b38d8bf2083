"""The inner layers' settings types are filled from the node config by name (learning/settings.py)."""

import dataclasses

import pytest

from swarm_node.config import MergeConfig, NetworkConfig, TrainConfig
from swarm_node.learning.settings import pick
from swarm_node.learning.trainer import TrainerSettings
from swarm_node.network.collector import CollectorSettings
from swarm_node.network.exchange import ExchangeSettings
from swarm_node.network.merging.settings import MergeSettings


@pytest.mark.parametrize("cls, sections", [
    (CollectorSettings, (NetworkConfig(max_tracked_peers=77), TrainConfig(num_external_groups=3))),
    (ExchangeSettings, (NetworkConfig(max_tracked_peers=77),)),
    (TrainerSettings, (TrainConfig(num_external_groups=3),)),
    (MergeSettings, (MergeConfig(),)),
])
def test_every_field_is_a_setting_of_the_node_config(cls, sections):
    settings = pick(cls, *sections)
    for field in dataclasses.fields(cls):
        source = next(s for s in sections if hasattr(s, field.name))
        assert getattr(settings, field.name) == getattr(source, field.name), field.name
    assert pick(cls, settings) is settings  # a settings object passes through


def test_a_missing_setting_is_named():
    with pytest.raises(AttributeError, match="num_external_groups"):
        pick(CollectorSettings, NetworkConfig())
    assert CollectorSettings.pick(NetworkConfig(), TrainConfig(num_external_groups=5)).num_external_groups == 5
