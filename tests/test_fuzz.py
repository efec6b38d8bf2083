"""Property-based fuzzing of every wire decoder and of task re-creation (issue 15), a short deterministic run.

Strategies live in tests/fuzz_cases.py (seeded from PROTOCOL.md's field tables); benchmarks/fuzz.py runs the same
properties for longer and reports cases and time. Here every property runs a fixed number of derandomized
examples, so CI sees the same inputs on every run. The per-example deadline is the time bound of the property
(a hang or a quadratic blow-up on one input fails it); the memory bound is checked with tracemalloc.
"""

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings

import fuzz_cases as fc

CI = settings(derandomize=True, max_examples=150, deadline=2000, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_BOUND_BYTES = 64 << 20  # per decoded message of <= 64 KiB


@pytest.mark.parametrize("name", sorted(fc.DECODERS))
def test_decoder_returns_or_raises_one_typed_reject(name):
    @CI
    @given(fc.encoded(*fc.DECODERS[name][1:]))
    def prop(data):
        tracemalloc.start()
        try:
            fc.check_decoder(name, data)
            assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND_BYTES
        finally:
            tracemalloc.stop()

    prop()


def test_the_strategies_reach_every_outcome():
    """The fuzz is not all garbage: over the decoders it reaches valid messages and every reject reason."""
    fc.outcomes.clear()

    @CI
    @given(fc.encoded(fc.requests, fc.golden("fetch_request_valid")))
    def prop(data):
        fc.check_decoder("fetch_request", data)

    prop()
    seen = {key.split(":")[1] for key in fc.outcomes}
    assert {"ok", "malformed", "schema", "version", "too_large"} <= seen, seen


@CI
@given(fc.decodable_specs(), fc.completions)
def test_recreate_and_score_return_or_raise_task_error(spec, completion):
    fc.check_recreate(spec, completion)
