"""One hostile peer in a merge group (issue 16), with real hivemind peers on 127.0.0.1 and small models.

Each test runs one attack against two honest peers that share a starting point and trained a little each. After
it, both honest peers are running, their weights are finite and within their trust region of where they were
(a rejected round keeps them), and once the attacker is gone they merge with each other again.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import msgpack
import psutil
import pytest
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.utils import get_dht_time

from merge_peers import (assert_close_lists, config, maddrs, merge_all, merger, model, shutdown, start_peers,
                         train_a_little, wait_visible, weights)
from swarm_node.network import wire
from swarm_node.network.merging import guard
from swarm_node.network.merging.averager import GuardedAllReduceRunner, MergeAverager
from swarm_node.network.merging.weights import WeightMerger

pytestmark = pytest.mark.slow

FAST = dict(merge_matchmaking_timeout_s=2.0, merge_allreduce_timeout_s=4.0, merge_state_load_timeout_s=8.0)


class Hostile(WeightMerger):
    """A WeightMerger that lies: `gather_patch` overrides fields of its gather (raw msgpack, no schema), `poison`
    writes NaN into its contribution after computing honest checksums, `state_patch` overrides its state's
    metadata."""

    gather_patch: dict = {}
    state_patch: dict = {}
    poison = False

    def _encoded_gather(self) -> bytes:
        raw = msgpack.unpackb(super()._encoded_gather())
        if self.poison:
            with self.averager.get_tensors() as tensors:
                tensors[0].fill_(float("nan"))
        return msgpack.packb({**raw, **self.gather_patch})

    def _shared_state(self):
        metadata, tensors = super()._shared_state()
        return msgpack.packb({**msgpack.unpackb(metadata), **self.state_patch}), tensors


class HeavyRunner(GuardedAllReduceRunner):
    """Sends its parts with weight 1e6 and, as a reducer, averages with the weights senders claim (hivemind's
    own reducer), as an unmodified hivemind peer with weight=1e6 would."""

    _accumulate_parts_streaming = AllReduceRunner._accumulate_parts_streaming

    def __init__(self, **kwargs):
        super().__init__(**{**kwargs, "weight": 1e6})


class HeavyAverager(MergeAverager):
    runner_cls = HeavyRunner


class Heavy(WeightMerger):
    averager_cls = HeavyAverager


class Swarm:
    """Two honest peers (same start, a little local training each) and one attacker."""

    def __init__(self, attacker_model: torch.nn.Module | None = None, attacker_cls=WeightMerger,
                 honest_cfg: dict | None = None, **attacker_cfg):
        self.peers = start_peers(3)
        self.models = [model(seed=0), model(seed=0)]
        self.honest = [merger(config(**FAST, **(honest_cfg or {})), p, m) for p, m in zip(self.peers, self.models)]
        self.attacker_model = attacker_model if attacker_model is not None else model(seed=0)
        self.attacker = merger(config(**{**FAST, **attacker_cfg}), self.peers[2], self.attacker_model,
                               cls=attacker_cls)
        self.attackers = [self.attacker]
        for i, m in enumerate(self.models):
            train_a_little(m, scale=1e-3, seed=10 + i)

    def radius(self, mg: WeightMerger) -> float:
        return mg.trust.radius(guard.distance([p.detach() for p in mg.params], mg.anchor), guard.norm(mg.anchor))

    def attack(self, everyone=None) -> tuple[list, list[list[torch.Tensor]], list[float]]:
        """One merge of all three; returns (honest results, honest weights before, their radii)."""
        before = [weights(m) for m in self.models]
        radii = [self.radius(mg) for mg in self.honest]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(mg.merge) for mg in self.honest + (everyone or self.attackers)]
            results = [f.result(timeout=120) for f in futures]
        print("attack results:", results)
        return results[:2], before, radii

    def assert_safe(self, before, radii) -> None:
        for m, b, r in zip(self.models, before, radii):
            now = weights(m)
            assert all(torch.isfinite(t).all() for t in now)
            assert guard.distance(now, b) <= r

    def assert_honest_pair_merges(self) -> None:
        """The attacker leaves; the honest pair trains a little more and merges to its own mean."""
        for a in self.attackers:
            a.shutdown()
        for i, m in enumerate(self.models):
            train_a_little(m, scale=1e-3, seed=20 + i)
        mean = [(a + b) / 2 for a, b in zip(weights(self.models[0]), weights(self.models[1]))]
        results = merge_all(self.honest)
        assert [r.outcome for r in results] == ["merged", "merged"], results
        for m in self.models:
            assert_close_lists(weights(m), mean, atol=1e-6)
        for mg in self.honest:  # building our own messages still works, levels stayed near ours
            assert mg.level <= 3 and wire.decode_merge_gather(mg._encoded_gather()).merges == mg.level

    def close(self) -> None:
        shutdown(self.honest + self.attackers, self.peers)


@pytest.fixture
def swarm_factory(reap_children):
    made = []

    def make(*args, visible: int = 2, **kwargs) -> Swarm:
        made.append(Swarm(*args, **kwargs))
        wait_visible(made[-1].honest, count=visible)
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_huge_merge_level_is_refused_or_bounded(swarm_factory):
    swarm = swarm_factory(attacker_cls=Hostile)
    Hostile.gather_patch = {"merges": 2**63 - 1, "priority": 1e12}  # beyond the schema: refused, blamed
    try:
        results, before, radii = swarm.attack()
        assert all(r.outcome == "failed" for r in results), results
        swarm.assert_safe(before, radii)
        attacker_id = swarm.attacker.averager.peer_id.to_base58().encode()
        assert all(mg.strikes.by_peer[attacker_id] >= 1 and mg.stats.rejected["bad_gather"] >= 1
                   for mg in swarm.honest)
        # the largest level the schema allows is accepted as a claim, but the group's level is a lower median
        Hostile.gather_patch = {"merges": wire.MAX_MERGE_LEVEL, "priority": float(wire.MAX_MERGE_LEVEL)}
        results, before, radii = swarm.attack()
        assert [r.outcome for r in results] == ["merged", "merged"], results
        assert all(mg.level == 1 for mg in swarm.honest)
        swarm.assert_honest_pair_merges()
    finally:
        Hostile.gather_patch = {}


def test_nan_contribution_with_finite_checksums_is_rejected(swarm_factory):
    swarm = swarm_factory(attacker_cls=Hostile)
    Hostile.poison = True
    try:
        results, before, radii = swarm.attack()
        assert all(r.outcome == "failed" for r in results), results
        swarm.assert_safe(before, radii)
        assert all(sum(mg.stats.rejected.values()) >= 1 for mg in swarm.honest)
        swarm.assert_honest_pair_merges()
    finally:
        Hostile.poison = False


def test_weight_1e6_does_not_take_over(swarm_factory):
    swarm = swarm_factory(attacker_model=model(seed=5), attacker_cls=Heavy)
    results, before, radii = swarm.attack()
    assert all(r.outcome == "failed" for r in results), results  # the attacker's own slice fails the checksums
    swarm.assert_safe(before, radii)
    far = weights(swarm.attacker_model)
    for m in swarm.models:
        assert guard.distance(weights(m), far) > 10 * guard.distance(weights(swarm.models[0]), weights(swarm.models[1]))
    swarm.assert_honest_pair_merges()


def test_hijack_through_failed_merge_and_repair_download(swarm_factory):
    swarm = swarm_factory(attacker_model=model(seed=5), attacker_cls=Hostile)
    Hostile.gather_patch = {"sums": [0.0, 0.0]}  # the wrong number of checksum segments: every round fails
    Hostile.state_patch = {"merges": wire.MAX_MERGE_LEVEL}  # and it claims the most merged state
    late_peer = None
    try:
        results, before, radii = swarm.attack()
        assert all(r.outcome == "failed" for r in results), results
        swarm.assert_safe(before, radii)
        assert all(mg.stats.state_loads == 0 for mg in swarm.honest)
        # a late joiner asks every member; the two honest ones agree, the attacker alone is not believed
        late_peer = start_peers(1, maddrs(swarm.peers[0]))[0]
        swarm.peers.append(late_peer)
        late_model = model(seed=9)
        late = merger(config(**FAST), late_peer, late_model)
        swarm.attackers.append(late)  # shut down with the attacker before the pair's last merge
        wait_visible([late], count=3)
        assert late.join(completed_rounds=0)
        assert_close_lists(weights(late_model), swarm.honest[0].anchor, atol=0)
        swarm.assert_honest_pair_merges()
    finally:
        Hostile.gather_patch, Hostile.state_patch = {}, {}


def test_late_joiner_does_not_trust_a_single_donor(swarm_factory):
    swarm = swarm_factory(attacker_model=model(seed=5))
    for mg in swarm.honest:
        mg.shutdown()  # only the attacker is left as a donor
    swarm.peers[0].dht.shutdown()
    late_peer = start_peers(1, maddrs(swarm.peers[2]))[0]
    swarm.peers.append(late_peer)
    own = model(seed=9)
    start = weights(own)
    late = merger(config(**FAST), late_peer, own)
    swarm.attackers.append(late)
    wait_visible([late], count=1)
    assert not late.join(completed_rounds=0)
    assert_close_lists(weights(own), start, atol=0)


def test_registry_overwrite_does_not_switch_merging_off(swarm_factory):
    swarm = swarm_factory()
    swarm.attacker.shutdown()  # the attacker only writes DHT records
    swarm.attackers = []
    dht, prefix = swarm.peers[2].dht, swarm.honest[0].prefix
    expiration = get_dht_time() + 600
    for mg in swarm.honest:
        # hivemind's unsigned donor list: "not a donor" for every honest peer (what switched them off before)
        dht.store(f"{prefix}.all_averagers", None, expiration, subkey=mg.peer_key)
        # the signed registry: a record under an honest peer's owner marker, which the attacker cannot sign
        dht.store(f"{prefix}.members", b"garbage", expiration, subkey=mg.registry.marker)
        # and a record the attacker signs itself, claiming an honest peer's ID
        record = msgpack.packb({"version": list(wire.PROTOCOL_VERSION), "peer_id": mg.registry.peer_id,
                                "mode": "params", "fingerprint": mg.fingerprint, "merges": 0})
        dht.store(f"{prefix}.members", record, expiration,
                  subkey=_marker(swarm.peers[2].key))
    time.sleep(1.0)
    for mg in swarm.honest:
        members = mg.registry.members()
        assert [m.peer_id for m in members] == [o.registry.peer_id for o in swarm.honest if o is not mg]
        assert mg._others_online()
    results = merge_all(swarm.honest)
    assert [r.outcome for r in results] == ["merged", "merged"], results
    swarm.assert_honest_pair_merges()


def _marker(key) -> bytes:
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator(key).local_public_key


def test_compression_mismatch_never_meets_and_is_refused(swarm_factory):
    # a misconfigured peer (fp16) sits under its own group key: the honest pair merges without waiting for it
    swarm = swarm_factory(merge_compression="fp16", visible=1)
    assert swarm.attacker.prefix != swarm.honest[0].prefix
    results, before, radii = swarm.attack()
    assert [r.outcome for r in results] == ["merged", "merged"], results
    assert all(r.group_size == 2 for r in results)
    # and one that forces its way into the group's key is refused by the honest reducers at once
    forced = ForcedPrefix
    forced.target = swarm.honest[0].prefix
    extra_peer = start_peers(1, maddrs(swarm.peers[0]))[0]
    swarm.peers.append(extra_peer)
    intruder = merger(config(**{**FAST, "merge_compression": "fp16"}), extra_peer, model(seed=0), cls=forced)
    swarm.attackers.append(intruder)
    wait_visible(swarm.honest, count=2)
    train_a_little(swarm.models[0], 1e-3, seed=3)
    results, before, radii = swarm.attack(everyone=[intruder])
    assert all(r.outcome in ("failed", "merged") for r in results), results
    swarm.assert_safe(before, radii)
    swarm.assert_honest_pair_merges()


class ForcedPrefix(WeightMerger):
    target = ""

    def _start_averager(self, matchmaking_s: float):
        self.prefix = self.target
        return super()._start_averager(matchmaking_s)


def test_noise_x10_with_honest_checksums_is_rejected(swarm_factory):
    noisy = model(seed=0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 10 * p.abs().mean())
    swarm = swarm_factory(attacker_model=noisy)
    results, before, radii = swarm.attack()
    assert all(r.outcome == "failed" for r in results), results
    assert all(mg.stats.rejected["trust_region"] >= 1 for mg in swarm.honest)
    swarm.assert_safe(before, radii)
    swarm.assert_honest_pair_merges()


# Under heavy load (CI next to a 4-agent SmolLM2 experiment) the follow-up merge of the two survivors once left one
# 132,096-value part un-averaged (a chunk timed out) and that merge failed safely; the same class as the moment-
# averaging flake in test_merge_peers.py. Passed 3 of 3 on a lighter load. Rerun until the cause is found.
@pytest.mark.flaky(reruns=2)
def test_member_frozen_mid_allreduce(reap_children):
    peers = start_peers(3)
    big = dict(FAST, merge_allreduce_timeout_s=6.0)
    models = [model(width=1024, layers=6, seed=0) for _ in range(3)]  # 6.3M values: the all-reduce takes a while
    mergers = [merger(config(**big), p, m) for p, m in zip(peers, models)]
    for i, m in enumerate(models):
        train_a_little(m, scale=1e-3, seed=i)
    wait_visible(mergers, count=2)
    frozen = None
    try:
        before = [weights(m) for m in models[:2]]
        radii = [mg.trust.radius(guard.distance([p.detach() for p in mg.params], mg.anchor), guard.norm(mg.anchor))
                 for mg in mergers[:2]]
        total = 4 * sum(p.numel() for p in models[0].parameters())
        pool = concurrent.futures.ThreadPoolExecutor(2)
        honest = [pool.submit(mergers[i].merge) for i in (0, 1)]
        threading.Thread(target=mergers[2].merge, daemon=True).start()
        deadline = time.monotonic() + 60
        while mergers[2].averager.traffic.totals()[1] < total // 20:
            assert time.monotonic() < deadline, "the victim never started averaging"
            time.sleep(0.002)
        frozen = psutil.Process(mergers[2].averager.pid)
        os.kill(frozen.pid, signal.SIGSTOP)
        results = [f.result(timeout=120) for f in honest]
        pool.shutdown()
        assert all(r.outcome in ("repaired", "failed") for r in results), results
        for m, b, r in zip(models[:2], before, radii):
            now = weights(m)
            assert all(torch.isfinite(t).all() for t in now) and guard.distance(now, b) <= r
        os.kill(frozen.pid, signal.SIGKILL)
        train_a_little(models[0], 1e-3, seed=7)
        mean = [(a + b) / 2 for a, b in zip(weights(models[0]), weights(models[1]))]
        again = merge_all(mergers[:2])
        assert [r.outcome for r in again] == ["merged", "merged"], again
        assert_close_lists(weights(models[0]), mean, atol=1e-6)
    finally:
        if frozen is not None and frozen.is_running():
            os.kill(frozen.pid, signal.SIGKILL)
        shutdown(mergers[:2], peers)



def test_centered_clip_keeps_honest_peers_merging_through_noise(swarm_factory):
    """With merge_aggregation = centered_clip (every reducer clips), a noise x10 member is clipped and the
    honest peers still merge, close to their own mean, instead of rejecting the round."""
    noisy = model(seed=0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 10 * p.abs().mean())
    clip = dict(merge_aggregation="centered_clip")
    swarm = swarm_factory(attacker_model=noisy, honest_cfg=clip, **clip)
    assert swarm.attacker.prefix == swarm.honest[0].prefix != swarm.honest[0].prefix.replace("nonewc", "nonew")
    honest_mean = [(a + b) / 2 for a, b in zip(weights(swarm.models[0]), weights(swarm.models[1]))]
    spread = guard.distance(weights(swarm.models[0]), honest_mean)
    results, before, radii = swarm.attack()
    assert [r.outcome for r in results] == ["merged", "merged"], results
    swarm.assert_safe(before, radii)
    for m in swarm.models:  # the attacker moved them by about the honest spread, not by its noise
        assert guard.distance(weights(m), honest_mean) < 2 * spread
    swarm.assert_honest_pair_merges()  # and without it, CenteredClip is the exact mean
