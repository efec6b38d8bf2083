"""swarm-node: a decentralized peer-to-peer node for collaborative RL post-training (SAPO over hivemind).

Layers:
- `swarm_node.learning`: tasks and rewards (reasoning-gym), models, generation, GRPO maths, the trainer.
- `swarm_node.network`: the DHT, the signed wire protocol, the rollout exchange over libp2p streams.
- `swarm_node.node`: the node that joins them (lifecycle and round loop), configured by `swarm_node.config`;
  `swarm_node.records` is the typed run log every tool reads (`cli`, `launcher`, `status`, `report`, `results`).
"""

__version__ = "0.1.0"
