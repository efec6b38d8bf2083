"""A complete metrics.jsonl line (every RoundRecord field a node writes) for tests of the run-log readers."""

from __future__ import annotations

import time
from typing import Any

from swarm_node.records import RoundRecord


def round_line(round_: int, **fields: Any) -> dict[str, Any]:
    """A valid RoundRecord as a dict, with plausible values; `fields` override them."""
    line = {"round": round_, "peer_id": "QmSelf", "model": "tiny", "policy_version": round_,
            "reward_local_mean": 0.1, "reward_train_mean": 0.1, "format_rate_local": 1.0, "local_groups": 2,
            "local_groups_generated": 2, "local_groups_with_signal": 1, "external_groups_available": 3,
            "external_groups_used": 2, "external_peers_used": 1, "external_peer_ids": ["QmOther"], "peers_seen": 1,
            "published": True, "rejected": {}, "pool_dropped": {}, "banned_peers": 0, "verify_ms_per_group": 1.0,
            "loss": 0.5, "grad_norm": 1.0, "clip_fraction": 0.0, "kl": 0.0, "offpolicy": {}, "peer_usefulness": {},
            "train_sequences": 16, "train_tokens": 300, "tokens_generated": 40, "bytes_in": 0, "bytes_out": 0,
            "generate_s": 0.4, "publish_s": 0.01, "collect_s": 0.0, "collect_wait_s": 0.0, "train_s": 0.3,
            "round_s": 0.8, "cpu_s": 1.0, "peak_rss_mb": 900.0, "time_s": time.time(), "rounds_failed": 0,
            "pace_wait_s": 0.0}
    line.update(fields)
    RoundRecord.model_validate(line)  # a helper that writes what no node writes would test nothing
    return line
