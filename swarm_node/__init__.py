"""swarm-node: a decentralized peer-to-peer node for collaborative RL post-training (SAPO over hivemind).

Layers:
- `swarm_node.learning`: tasks and rewards (reasoning-gym), models, generation, GRPO maths, the trainer.
- `swarm_node.network`: the DHT, the signed wire protocol, the rollout exchange over libp2p streams.
- `swarm_node.node`: the node that joins them (round loop), with `config`, `cli`, `launcher`, `metrics`.
"""

__version__ = "0.1.0"
