"""Config precedence (defaults < file < env < flags) and operator-error messages."""

import subprocess
import sys

import pytest

from swarm_node.config import ConfigError, load_config


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text('rounds = 5\n[train]\nnum_local_groups = 2\nlearning_rate = 1e-4\n[network]\nnum_shards = 2\n')
    env = {"SWARM_NODE_NUM_LOCAL_GROUPS": "3", "SWARM_NODE_INITIAL_PEERS": "/ip4/1.2.3.4/tcp/1/p2p/QmX,/ip4/5.6.7.8/tcp/2/p2p/QmY"}
    cfg = load_config(str(path), {"learning_rate": 3e-4}, environ=env)
    assert cfg.rounds == 5 and cfg.network.num_shards == 2  # file
    assert cfg.train.num_local_groups == 3  # env beats file
    assert cfg.train.learning_rate == 3e-4  # flag beats file
    assert cfg.network.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/QmX", "/ip4/5.6.7.8/tcp/2/p2p/QmY"]
    assert load_config(environ={}).train.num_external_groups == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(overrides={"num_completions": 1}), "num_completions"),
    (dict(overrides={"no_such": 1}), "unknown setting 'no_such'"),
    (dict(environ={"SWARM_NODE_BOGUS": "1"}), "SWARM_NODE_BOGUS"),
    (dict(overrides={"tasks": ["chain_sum"]}), "task_preset"),
    (dict(overrides={"task_preset": "custom"}), "at least one entry"),
    (dict(file="/nonexistent/node.toml"), "does not exist"),
    (dict(overrides={"optimizer": "adafactor", "merge_mode": "grad"}), "--optimizer adamw"),
    (dict(overrides={"optimizer": "adafactor", "merge_mode": "params", "merge_optimizer_state": "average"}),
     "merge-optimizer-state keep"),
    (dict(overrides={"optimizer": "sgd"}), "optimizer"),
])
def test_operator_mistakes_give_one_clear_message(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError, match=message):
        load_config(**kwargs)


def test_unreadable_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not readable TOML"):
        load_config(str(path), environ={})


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "swarm_node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_bad_flag_value_is_one_line_not_a_traceback():
    result = run_cli("run", "--num-completions", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid setting train.num_completions")
    assert "Traceback" not in result.stderr


def test_cli_config_doc_lists_every_setting():
    result = run_cli("config-doc")
    assert result.returncode == 0
    assert "`--num-external-groups`" in result.stdout and "SWARM_NODE_COLLECT_TIMEOUT_S" in result.stdout


@pytest.mark.parametrize("name", ["sapo", "My_swarm-2", "x" * 64])
def test_swarm_name_is_used_as_given(name):
    assert load_config(None, {"swarm_name": name}, environ={}).network.swarm_name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "sän", "a/b", "a b", "a.b"])
def test_swarm_name_outside_the_protocol_grammar_is_an_operator_error(name):
    """PROTOCOL.md: swarm_name is 1-64 of [A-Za-z0-9_-]; the code never rewrites it (it kept non-ASCII letters)."""
    with pytest.raises(ConfigError, match="swarm_name"):
        load_config(None, {"swarm_name": name}, environ={})


def test_configuration_doc_is_the_generated_reference():
    """docs/configuration.md's table is `swarm-node config-doc`'s output: a setting added or changed in
    swarm_node/config/ without regenerating the doc fails here."""
    from pathlib import Path

    from swarm_node.config import config_reference

    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert config_reference() in doc, "regenerate the table: swarm-node config-doc"
