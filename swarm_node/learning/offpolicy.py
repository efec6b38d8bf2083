"""Aligning a generator's per-token log-probs with the learner's tokens, and what of a shared completion is trained on.

Off-policy correction (F-TIS, arXiv 2605.22537) needs, for every token the learner trains on, the log-prob the
generator sampled it with. Completions travel as text, so the learner re-tokenises them; the generator keeps
log-probs only when that re-tokenisation gives back its sampled tokens (learning/generation.py), and the
learner accepts them only when its tokenizer identity is the same and the lengths agree here.

Poisoning ("Hail to the Thief", arXiv 2511.09780): the verifier reads only the last <answer>...</answer>, so text
after it is never checked but would be trained on with the completion's advantage. `truncate_after_answer` cuts
it off; the reward does not change.
"""

from __future__ import annotations

ANSWER_CLOSE = "</answer>"


def truncate_after_answer(completion: str) -> str:
    """The completion up to and including its last `</answer>`; unchanged when it has none."""
    end = completion.rfind(ANSWER_CLOSE)
    return completion if end < 0 else completion[: end + len(ANSWER_CLOSE)]


def align_logprobs(logprobs: list[float], full_ids: list[int], ids: list[int],
                   eos_appended: bool) -> list[float] | None:
    """The generator log-probs of the tokens the learner trains on, or None when they cannot be aligned.

    Args:
        logprobs: the generator's per-token log-probs of the whole completion: len(full_ids) + 1 when it ended
            with EOS, len(full_ids) when it hit its token limit.
        full_ids: the learner's tokenisation of the whole completion text.
        ids: the tokens trained on: a prefix of full_ids (cut at max_new_tokens or after the answer), plus EOS
            when `eos_appended`.
        eos_appended: the learner appended EOS to `ids`.

    Returns:
        A list of at most len(ids) floats for the leading tokens of `ids` (an appended EOS the generator never
        sampled has no log-prob and is left out: ratio 1), or None (unknown length, or `ids` is not a prefix).
    """
    if not logprobs:
        return None
    generator_eos = len(logprobs) == len(full_ids) + 1
    if not generator_eos and len(logprobs) != len(full_ids):
        return None
    body = ids[:-1] if eos_appended else ids
    if body != full_ids[: len(body)]:
        return None
    aligned = list(logprobs[: len(body)])
    if eos_appended and len(body) == len(full_ids) and generator_eos:
        aligned.append(logprobs[len(body)])
    return aligned
