"""The node calls transformers only through its supported API: no deprecated keyword (e.g. `past_key_values`,
removed from `LlamaForCausalLM.forward` in 5.40; the KV cache goes in as `cache=`), and the installed release is
inside the range pyproject.toml pins, so a fresh install gets a release these tests ran against."""

import tomllib
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
from packaging.requirements import Requirement

from swarm_node.config import TrainConfig
from swarm_node.learning.generation import generate
from swarm_node.learning.sapo import Group
from swarm_node.learning.tasks import TaskSet, TaskSpec
from swarm_node.learning.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _deprecations_are_errors():
    """Turn transformers' deprecation notices (FutureWarning "... is deprecated ...") into errors."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.filterwarnings("error", message=r".*deprecated.*", category=FutureWarning)
    warnings.filterwarnings("error", message=r".*deprecated.*", category=DeprecationWarning, module="transformers")
    return ctx


def test_generation_and_training_use_no_deprecated_transformers_argument(tiny_policy_factory):
    policy = tiny_policy_factory()
    taskset = TaskSet("smol", [], -1, 0, 1000)
    ctx = _deprecations_are_errors()
    try:
        out = generate(policy, ["What is 2 + 3?", "Hi"], num_completions=3, max_new_tokens=6, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
        trainer = Trainer(policy, TrainConfig(model="tiny", max_new_tokens=8), taskset)
        spec = TaskSpec("chain_sum", taskset.tasks["chain_sum"], 0, 3, 1000)
        batch, _ = trainer._sequences([Group(spec, ["<answer>3</answer>", "no idea", "<answer>4"], [1.0, 0.0, 0.0],
                                             "QmLocal", 1, 0, "tiny")])
        logp, mask = trainer._completion_logprobs(policy.model, batch)
    finally:
        ctx.__exit__(None, None, None)
    assert [len(c) for c in out.completions] == [3, 3] and out.num_tokens > 0
    assert logp.shape == mask.shape and bool(mask.any())


def test_installed_transformers_is_inside_the_pinned_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == "transformers"]
    assert any(s.operator == "<" for s in req.specifier), f"no upper bound on transformers: {req}"
    assert req.specifier.contains(version("transformers")), f"installed {version('transformers')} not in {req}"
