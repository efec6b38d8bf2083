"""The network section: joining the swarm, the exchange's limits and the trust rules (`NetworkConfig`)."""

from __future__ import annotations

from pydantic import Field

from swarm_node.config.base import Section


class NetworkConfig(Section):
    """Joining the swarm: addresses, identity and the rollout exchange."""

    initial_peers: list[str] = Field(
        default_factory=list,
        description="Multiaddrs of bootstrap peers, e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm... Empty starts a new swarm.",
    )
    initial_peers_file: str | None = Field(
        None,
        description="node.json of a bootstrap peer on this machine or a shared volume (swarm-node writes it once "
        "the peer has joined); its multiaddrs are added to initial_peers. The node loads its model first and then "
        "waits up to initial_peers_file_timeout_s for the file, so every node of a local swarm can start at once.",
    )
    initial_peers_file_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for initial_peers_file to appear, seconds."
    )
    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"],
        description="Multiaddrs to listen on. Use /ip4/0.0.0.0/tcp/31337 to accept connections from other machines.",
    )
    announce_maddrs: list[str] = Field(
        default_factory=list, description="Multiaddrs to announce to peers (public address behind NAT/port mapping)."
    )
    client_mode: bool = Field(
        False, description="Run the DHT in client mode (serve no DHT requests), for nodes behind NAT; the node still "
        "serves its rollouts to peers that can reach it."
    )
    use_relay: bool = Field(True, description="Allow reaching peers behind NAT through libp2p circuit relays.")
    use_auto_relay: bool = Field(
        False, description="Look for relays to become reachable when this node is behind NAT/firewall (libp2p AutoRelay)."
    )
    identity_path: str = Field(
        "", description="Private key file of the node's peer ID; created on first run. Empty: <output_dir>/identity.key."
    )
    swarm_name: str = Field(
        "sapo", pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Namespace of the DHT keys; nodes only exchange within one swarm name. 1-64 ASCII letters, "
        "digits, `_` or `-` (protocols/PROTOCOL.md), so it is used in keys as given, never rewritten.",
    )
    num_shards: int = Field(
        8, ge=1, le=65536, description="DHT keys that peers' manifests are spread over (one value per shard). The "
        "whole swarm must agree. Rule (protocols/PROTOCOL.md, Sampled reads): the smallest power of two >= N / 32 "
        "for the largest expected swarm size N, at least 8: 8 up to 256 peers, 32 for 1,000, 512 for 10,000, "
        "4,096 for 100,000. Above 256 it must be a power of two."
    )
    dht_replicas: int = Field(
        10, ge=1, le=64, description="DHT nodes asked to store each manifest (hivemind num_replicas). More replicas "
        "make every peer's manifest visible to every reader sooner, at one small store RPC per replica per round."
    )
    publish_ttl_s: float = Field(600.0, gt=0, description="Lifetime of a published manifest in the DHT, seconds.")
    collect_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Unused since collection runs in the background and a round never waits for peers (kept so "
        "that existing configs load); see collect_interval_s, max_staleness_s and max_policy_lag.",
    )
    collect_interval_s: float = Field(
        1.0, gt=0, description="Period of the background collection cycle (DHT poll, fetches, verification into "
        "the pool of external groups), seconds. Each cycle reads num_shards DHT keys."
    )
    max_policy_lag: int = Field(
        4, ge=0, description="Drop a pooled external group once its generator has announced a policy version more "
        "than this many optimizer steps newer than the one that generated it (counted as `max_policy_lag` in "
        "pool_dropped). Lag is measured in the generator's own versions: different nodes' counters are independent."
    )
    fetch_timeout_s: float = Field(10.0, gt=0, description="Deadline for fetching one peer's rollouts, seconds.")
    dht_timeout_s: float = Field(10.0, gt=0, description="Deadline for one DHT call, seconds.")
    max_staleness_s: float = Field(
        300.0, gt=0, description="Use peers' rollouts published at most this long ago (DHT clock), seconds; older "
        "pooled groups are dropped unused (counted as `max_staleness_s` in pool_dropped). Round counters of "
        "different nodes are independent, so freshness is judged by time, not by round numbers."
    )
    max_clock_skew_s: float = Field(
        30.0, ge=0, description="Reject manifests stamped further than this in the future (DHT clock), seconds."
    )
    max_payload_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest rollout payload accepted from one peer for one round, bytes."
    )
    min_peers: int = Field(
        0, ge=0, description="Before the first round, wait until this many other peers are connected (at most "
        "min_peers_timeout_s). The local swarm launcher sets it to N-1 so all nodes start together."
    )
    min_peers_timeout_s: float = Field(120.0, ge=0, description="Longest wait for min_peers before round 1, seconds.")
    max_manifests_per_round: int = Field(
        64, ge=1, description="New peer manifests one collection poll considers at most (peers that delivered "
        "before go first); the rest wait for a later poll and are counted once as `flood`. What is fetched is "
        "bounded further by fetches_per_round."
    )
    max_shard_reads_per_poll: int = Field(
        8, ge=1, description="Most shard keys one collection poll reads; the node reads a random subset of the "
        "shards, sized to see about target_manifests_per_poll manifests (all shards in a small swarm)."
    )
    target_manifests_per_poll: int = Field(
        8, ge=1, description="Manifests a collection poll aims to read (at least 2 x J is used), so the DHT bytes "
        "read per poll do not grow with the swarm."
    )
    fetches_per_round: int = Field(
        6, ge=1, description="Peer payloads fetched per round at least (more if needed to fill J with "
        "fetch_margin). With every node fetching this many uniformly, a fresh payload is missed by all nodes with "
        "probability about e^-fetches_per_round."
    )
    fetch_margin: float = Field(
        2.0, ge=1.0, description="Fetch enough payloads per round for fetch_margin x J external groups."
    )
    explore_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of fetches that go to a random newcomer (a peer that has not yet "
        "delivered valid groups) rather than to a known-good peer, so newcomers are found."
    )
    max_inflight_fetches: int = Field(
        8, ge=1, description="Most peer payloads being fetched and verified at once: nothing waits on more peers."
    )
    max_groups_per_payload: int = Field(32, ge=1, le=64, description="Groups accepted in one peer payload.")
    max_completions_per_group: int = Field(32, ge=2, le=64, description="Completions accepted per peer group.")
    max_completion_chars: int = Field(4096, ge=1, le=8192, description="Characters accepted per peer completion.")
    max_prompt_tokens: int = Field(
        1024, ge=16, description="Largest prompt (the re-created question with its few-shot examples, local tokenizer) "
        "of a peer's group; longer ones are dropped as `prompt_too_long` before tokenising for training."
    )
    verify_timeout_s: float = Field(
        5.0, gt=0, description="Deadline for re-creating and scoring one peer payload in the verification worker "
        "process, seconds; over it the worker is killed and restarted and the payload dropped as `verify_timeout`."
    )
    verify_memory_mb: int = Field(
        1024, ge=512, description="Address-space limit (RLIMIT_AS) of the verification worker process, MiB; a group "
        "whose re-creation needs more is dropped as `verify_memory`."
    )
    max_tracked_peers: int = Field(
        4096, ge=16, description="Most peers whose per-peer state (strikes, bans, failure and admission counts) "
        "the node remembers; the least recently seen are forgotten first, and all of it after max(ban_cooldown_s, "
        "2 x max_staleness_s). Manifest and record memories hold 4 times as many entries, group-content digests 16 times. Bounds memory "
        "under a flood of fresh peer IDs."
    )
    ban_strikes: int = Field(3, ge=1, description="Protocol violations after which a peer is ignored.")
    ban_cooldown_s: float = Field(600.0, ge=0, description="How long a peer is ignored after a ban, seconds.")
    startup_retries: int = Field(2, ge=0, description="Extra attempts to start the p2p daemon and DHT after a failure.")
    startup_timeout_s: float = Field(30.0, gt=0, description="Deadline for the p2p daemon and DHT to start, seconds.")
