"""Merging without a network: fingerprints, schedules, checksums, the DiLoCo outer step, config and wire checks."""

import math

import msgpack
import pytest
import torch

import swarm_node.network  # noqa: F401  (hivemind patches)
from swarm_node.config import ConfigError, load_config
from swarm_node.learning.diloco import nesterov_outer_step, pseudo_gradient
from swarm_node.network import wire
from swarm_node.network.merging import checksum
from swarm_node.network.merging.fingerprint import merge_prefix, model_fingerprint
from swarm_node.network.merging.schedule import MergeSchedule, late_merge_rounds


def mlp(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def test_fingerprint_depends_on_architecture_not_weights():
    assert model_fingerprint(mlp(8, seed=0)) == model_fingerprint(mlp(8, seed=1))
    assert model_fingerprint(mlp(8)) != model_fingerprint(mlp(9))
    assert model_fingerprint(mlp(8)) != model_fingerprint(mlp(8).double())
    fp = model_fingerprint(mlp(8))
    assert len(fp) == 64 and int(fp, 16) >= 0
    prefix = merge_prefix("my.swarm", fp, "params")
    assert "." not in prefix and fp[:16] in prefix
    assert merge_prefix("my.swarm", fp, "params") != merge_prefix("my.swarm", fp, "diloco")


def test_tiny_models_with_other_seeds_share_a_fingerprint():
    from swarm_node.learning.models import tiny_model

    a, b = tiny_model(1000, seed=0), tiny_model(1000, seed=1)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_schedules():
    every = MergeSchedule("every_k", 3, 0)  # counts rounds since the last merge, whatever the round number
    assert [since for since in range(0, 6) if every.is_due(100 + since, since)] == [3, 4, 5]
    assert every.joins_peers and not MergeSchedule("late", 5, 20).joins_peers
    assert not any(MergeSchedule("off", 1, 10).is_due(r, r) for r in range(1, 11))
    rounds = late_merge_rounds(20, 4)
    assert rounds == [10, 15, 18, 20]
    gaps = [b - a for a, b in zip(rounds, rounds[1:])]
    assert gaps == sorted(gaps, reverse=True)  # denser toward the end
    late = MergeSchedule("late", 5, 20)
    assert [r for r in range(1, 21) if late.is_due(r, 0)] == rounds
    assert late.is_final(20) and not late.is_final(18)
    assert late_merge_rounds(3, 1) == [3]  # a single global merge at the end


def test_diloco_outer_step_matches_a_hand_computed_reference():
    # two outer steps on one scalar, lr 0.7, momentum 0.9, worked out by hand:
    # step 1: anchor 1.0, worker weights 0.8 and 0.6 -> delta = mean(1.0 - 0.8, 1.0 - 0.6) = 0.3
    #         m = 0.3; anchor = 1.0 - 0.7 * (0.3 + 0.9 * 0.3) = 1.0 - 0.399 = 0.601
    # step 2: workers at 0.501 and 0.401 -> delta = mean(0.1, 0.2) = 0.15
    #         m = 0.9 * 0.3 + 0.15 = 0.42; anchor = 0.601 - 0.7 * (0.15 + 0.9 * 0.42) = 0.601 - 0.3696 = 0.2314
    anchor, momentum = [torch.tensor([1.0], dtype=torch.float64)], [torch.zeros(1, dtype=torch.float64)]
    for workers, expected in (([0.8, 0.6], 0.601), ([0.501, 0.401], 0.2314)):
        deltas = []
        for w in workers:
            out = [torch.zeros(1, dtype=torch.float64)]
            pseudo_gradient(anchor, [torch.tensor([w], dtype=torch.float64)], out)
            deltas.append(out[0])
        nesterov_outer_step(anchor, [sum(deltas) / len(deltas)], momentum, lr=0.7, mu=0.9)
        assert anchor[0].item() == pytest.approx(expected, abs=1e-12)


def test_diloco_outer_step_by_torch_sgd_equals_the_written_out_formula():
    """The outer step is torch.optim.SGD(nesterov=True); its numbers equal DiLoCo's formula written out (the
    node's own implementation before issue 13), and the momentum stays in the caller's tensors (shared, saved)."""
    torch.manual_seed(0)
    for lr, mu in ((0.7, 0.9), (0.5, 0.5), (1.0, 0.0)):
        anchor = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
        momentum = [torch.zeros_like(a) for a in anchor]
        ref_anchor, ref_momentum = [a.clone() for a in anchor], [m.clone() for m in momentum]
        buffers = [id(m) for m in momentum]
        for _ in range(3):
            delta = [torch.randn_like(a) for a in anchor]
            nesterov_outer_step(anchor, delta, momentum, lr=lr, mu=mu)
            for a, d, m in zip(ref_anchor, delta, ref_momentum):  # m <- mu m + d; a <- a - lr (d + mu m)
                m.mul_(mu).add_(d)
                a.sub_(d + mu * m, alpha=lr)
        assert [id(m) for m in momentum] == buffers
        for got, want in zip(anchor + momentum, ref_anchor + ref_momentum):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert all(a.grad is None for a in anchor)
    # lr 1 and no momentum is plain averaging: anchor - (anchor - mean) = mean
    anchor, workers = [torch.tensor([2.0])], [torch.tensor([1.0]), torch.tensor([4.0])]
    delta = [sum(anchor[0] - w for w in workers) / 2]
    nesterov_outer_step(anchor, delta, [torch.zeros(1)], lr=1.0, mu=0.0)
    assert anchor[0].item() == pytest.approx(2.5)


def test_checksums_are_linear_and_catch_an_unaveraged_part():
    torch.manual_seed(0)
    members = [[torch.randn(300, 40), torch.randn(1000)] for _ in range(3)]
    groups = checksum.segments(members[0])
    mean = [sum(ts) / 3 for ts in zip(*members)]
    expected = checksum.expected_checksums([(checksum.checksums(m, groups), 1.0) for m in members])
    segment_norms = checksum.norms(mean, groups)
    assert checksum.mismatch(checksum.checksums(mean, groups), expected, segment_norms, "none") < 0.1
    # fp16 rounding of every value stays inside the fp16 tolerance
    rounded = [t.half().float() for t in mean]
    assert checksum.mismatch(checksum.checksums(rounded, groups), expected, segment_norms, "fp16") < 1
    # one peer's part left un-averaged (what a failed reducer leaves behind)
    broken = [t.clone() for t in mean]
    broken[0].view(-1)[:2000] = members[0][0].view(-1)[:2000]
    assert checksum.mismatch(checksum.checksums(broken, groups), expected, segment_norms, "none") > 1
    assert checksum.mismatch(checksum.checksums(broken, groups), expected, segment_norms, "fp16") > 1
    many = [torch.zeros(1)] * 1000
    assert len(checksum.segments(many)) <= wire.MAX_MERGE_SEGMENTS
    assert sorted(i for g in checksum.segments(many) for i in g) == list(range(1000))


def test_8bit_compression_decodes_on_numpy_2():
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import runtime_pb2

    t = torch.randn(10_000)
    for kind in (runtime_pb2.UNIFORM_8BIT, runtime_pb2.QUANTILE_8BIT):
        out = deserialize_torch_tensor(serialize_torch_tensor(t, kind))
        assert out.shape == t.shape and (out - t).pow(2).mean().sqrt() < 0.05


def test_merge_gather_is_checked_at_the_boundary():
    good = dict(version=[1, 0], mode="params", fingerprint="ab" * 32, sums=[1.0, -2.5])
    assert wire.decode_merge_gather(msgpack.packb(good)).sums == [1.0, -2.5]
    assert wire.decode_merge_gather(msgpack.packb(dict(good, later_field=1, version=[1, 4]))).mode == "params"
    for bad in (dict(good, sums=[math.nan, 1.0]), dict(good, fingerprint="xyz"), dict(good, sums=[1.0]),
                dict(good, sums=[0.0] * (2 * wire.MAX_MERGE_SEGMENTS + 2)), dict(good, weight=0.0),
                dict(good, version=[2, 0])):
        with pytest.raises(wire.WireError):
            wire.decode_merge_gather(msgpack.packb(bad))
    with pytest.raises(wire.WireError, match="too_large"):
        wire.decode_merge_gather(b"\x00" * (wire.MAX_MERGE_MESSAGE_BYTES + 1))


@pytest.mark.parametrize("overrides, message", [
    ({"merge_mode": "params", "merge_schedule": "late"}, "needs|--rounds"),
    ({"merge_mode": "grad", "steps_per_round": 2}, "steps-per-round 1"),
    ({"merge_mode": "grad", "merge_optimizer_state": "reset"}, "leave it at keep"),
    ({"merge_min_group_size": 4, "merge_target_group_size": 3}, "below merge_min_group_size"),
])
def test_merge_config_mistakes(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, environ={})


def test_merge_settings_have_flags_and_env():
    cfg = load_config(overrides={"merge_mode": "diloco", "rounds": 10, "merge_schedule": "late"},
                      environ={"SWARM_NODE_MERGE_COMPRESSION": "8bit", "SWARM_NODE_DILOCO_OUTER_LR": "0.5"})
    assert cfg.merge.merge_mode == "diloco" and cfg.merge.merge_compression == "8bit"
    assert cfg.merge.diloco_outer_lr == 0.5 and cfg.merge.diloco_outer_momentum == 0.9


def test_checksum_mismatch_never_loses_a_nan():
    from swarm_node.network.merging.checksum import mismatch

    assert mismatch([1.0, 2.0], [1.0, 2.0], [1.0], "none") == 0.0
    assert mismatch([math.nan, 2.0], [1.0, 2.0], [1.0], "none") == math.inf
    assert mismatch([1.0, 2.0], [1.0, math.inf], [1.0], "none") == math.inf
    assert mismatch([1.0, 2.0], [1.0, 2.0], [math.nan], "none") == math.inf
    assert mismatch([1.0, 2.0, 3.0, 4.0], [1.0, 2.0], [1.0, 1.0], "none") == math.inf  # length mismatch


def test_gather_bounds_weight_and_levels():
    good = dict(version=[1, 0], mode="params", fingerprint="ab" * 32, sums=[1.0, -2.5])
    assert wire.decode_merge_gather(msgpack.packb(dict(good, merges=wire.MAX_MERGE_LEVEL))).merges == wire.MAX_MERGE_LEVEL
    for bad in (dict(good, weight=1e6), dict(good, weight=0.5), dict(good, merges=2**63 - 1),
                dict(good, merges=wire.MAX_MERGE_LEVEL + 1), dict(good, priority=1e12), dict(good, priority=-1.0),
                dict(good, optimizer_step=2**40)):
        with pytest.raises(wire.WireError):
            wire.decode_merge_gather(msgpack.packb(bad))


def test_levels_follow_the_lower_median_and_stay_bounded():
    from swarm_node.network.merging.guard import next_level

    assert next_level([3, wire.MAX_MERGE_LEVEL]) == 4  # a pair: the lower of the two
    assert next_level([3, 5, wire.MAX_MERGE_LEVEL]) == 6  # a minority cannot raise it
    assert next_level([wire.MAX_MERGE_LEVEL] * 2) == wire.MAX_MERGE_LEVEL  # clamped: our next gather still builds


def test_trust_radius_follows_own_recent_updates():
    from swarm_node.network.merging.guard import TrustRegion

    trust = TrustRegion(factor=4.0, min_rel=0.01, history=2)
    assert trust.radius(0.0, 100.0) == pytest.approx(1.0)  # the floor
    trust.note(2.0)
    assert trust.radius(0.5, 100.0) == pytest.approx(8.0)  # a recent larger update counts
    trust.note(0.1)
    trust.note(0.1)  # history 2: the old update has aged out
    assert trust.radius(0.5, 100.0) == pytest.approx(2.0)


def test_a_state_needs_two_agreeing_donors_and_a_majority():
    from swarm_node.network.merging.guard import agreeing_states

    def info(x: float) -> wire.MergeStateInfo:
        return wire.MergeStateInfo(version=(1, 0), mode="params", fingerprint="ab" * 32, merges=1, sums=[x, x])

    scale = [1.0]
    assert agreeing_states({b"a": info(1.0)}, scale, "none") == []  # one donor alone is never believed
    assert agreeing_states({b"a": info(1.0), b"h": info(9.0)}, scale, "none") == []  # a tie
    assert sorted(agreeing_states({b"a": info(1.0), b"b": info(1.0), b"h": info(9.0)}, scale, "none")) == [b"a", b"b"]
    assert agreeing_states({b"a": info(1.0), b"b": info(1.0), b"h": info(9.0), b"i": info(9.0)}, scale, "none") == []


def test_robust_rules_equal_the_mean_without_outliers_and_bound_one_outlier():
    from swarm_node.network.merging.robust import centered_clip, trimmed_mean

    torch.manual_seed(0)
    honest = torch.randn(4, 1000) * 0.01 + 1.0
    mean = honest.mean(dim=0)
    spread = float((honest - mean).norm(dim=1).max())
    torch.testing.assert_close(centered_clip(honest, tau=2 * spread), mean)
    torch.testing.assert_close(trimmed_mean(honest, 0), mean)
    attacked = torch.cat([honest, torch.full((1, 1000), 1e6)])
    for out in (centered_clip(attacked, tau=2 * spread), trimmed_mean(attacked, 1)):
        assert float((out - mean).norm()) < 3 * spread  # the 1e6 row moves it by a bounded amount
    with pytest.raises(ValueError):
        trimmed_mean(honest, 2)
    from swarm_node.network.merging.robust import self_calibrated_clip

    torch.testing.assert_close(self_calibrated_clip(honest), mean)  # nobody far off: the exact mean
    assert float((self_calibrated_clip(attacked) - mean).norm()) < 3 * spread


def test_compression_and_moments_are_part_of_the_group_key():
    from swarm_node.network.merging.fingerprint import merge_layout

    fp = "ab" * 32
    keys = {merge_prefix("s", fp, "params", merge_layout(c, o, "params"))
            for c in ("none", "fp16", "8bit") for o in ("keep", "average")}
    assert len(keys) == 6 and all("." not in k for k in keys)
    assert merge_layout("fp16", "keep", "params") == merge_layout("fp16", "reset", "params")  # same bytes on the wire


def test_both_mergers_have_what_the_node_calls():
    from swarm_node.network.merging import Merger
    from swarm_node.network.merging.grad import GradMerger
    from swarm_node.network.merging.weights import WeightMerger

    for cls in (WeightMerger, GradMerger):
        assert issubclass(cls, Merger), f"{cls.__name__} lacks a method of the Merger protocol"
    assert not issubclass(object, Merger)
    assert hasattr(WeightMerger, "state_dict") and not hasattr(GradMerger, "state_dict")  # node/state.py relies on it
