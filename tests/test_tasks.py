"""Task specs re-create the same question and answer; the strict verifier; prompts."""

import dataclasses
import random

import pytest

from swarm_node.learning.tasks import (RG_VERSION, SpecError, TaskError, TaskSet, TaskSpec, has_answer_tags, recreate, score,
                                       stream_seed)


@pytest.fixture(scope="module")
def taskset():
    return TaskSet("smol", [], -1, seed=3, size=10_000)


def test_spec_recreates_same_question_and_answer(taskset):
    rng = random.Random(0)
    for _ in range(20):
        spec = taskset.draw(rng)
        a, b = recreate(spec), recreate(TaskSpec(**dataclasses.asdict(spec)))
        assert a.text == b.text and a.answer == b.answer
        assert spec.rg_version == RG_VERSION


def test_strict_verifier(taskset):
    question = recreate(TaskSpec("chain_sum", taskset.tasks["chain_sum"], 3, 7, 10_000))
    assert score(question, f"<answer>{question.answer}</answer>") == 1.0
    assert score(question, f"the answer is {question.answer}") == 0.0  # no tags, no reward
    assert score(question, "<answer>not a number</answer>") == 0.0
    assert has_answer_tags("<answer>1</answer>") and not has_answer_tags("1")


@pytest.mark.parametrize("bad, why", [
    (dict(dataset="no_such_task"), "unknown"),
    (dict(index=10_000), "outside"),
    (dict(index=-1), "outside"),
    (dict(rg_version="0.0.1"), "version"),
    (dict(config={"bogus": 1}), "cannot build"),
])
def test_bad_specs_are_rejected(bad, why):
    spec = dataclasses.replace(TaskSpec("chain_sum", {}, 0, 1, 10_000), **bad)
    with pytest.raises(SpecError, match=why):
        recreate(spec)


def test_prompt_has_fewshot_turns_derived_from_spec(taskset):
    spec = TaskSpec("basic_arithmetic", taskset.tasks["basic_arithmetic"], 3, 42, 10_000)
    messages = taskset.messages(recreate(spec))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"].startswith("<answer>") and messages[-1]["content"] == recreate(spec).text
    assert messages == taskset.messages(recreate(spec))  # deterministic: every node builds the same prompt


def test_paper_preset_and_custom_tasks():
    paper = TaskSet("paper", [], -1, 0, 1000)
    assert len(paper.tasks) == 9 and paper.num_fewshot == 0
    custom = TaskSet("custom", ['spell_backward:{"min_word_len": 3, "max_word_len": 4}'], 1, 0, 1000)
    assert custom.tasks == {"spell_backward": {"min_word_len": 3, "max_word_len": 4}}
    with pytest.raises(TaskError, match="unknown task"):
        TaskSet("custom", ["not_a_task"], 1, 0, 1000)
    with pytest.raises(TaskError, match="task chain_sum: cannot build"):  # the operator's own config: an operator error
        TaskSet("custom", ['chain_sum:{"bogus": 1}'], 1, 0, 1000)
    assert not issubclass(SpecError, TaskError)  # a peer's bad spec is never reported as the operator's mistake


def test_stream_seed_differs_per_peer():
    assert stream_seed(0, "QmA") != stream_seed(0, "QmB")
    assert stream_seed(0, "QmA") == stream_seed(0, "QmA")
