"""The network layer: hivemind DHT membership, the signed manifest index, the rollout exchange, and merging.

- `hivemind_patch`: fixes hivemind's uvloop pipe desync and 8-bit decoders before any DHT exists (on import).
- `wire`: message structs and the msgpack codec (the protocol contract, see protocols/PROTOCOL.md).
- `identity`: the persistent RSA identity that is both the libp2p peer ID and the record-signing key.
- `exchange`: publishing per-round manifests in the DHT and moving rollout payloads over libp2p streams.
- `merging/`: merging weights (params, DiLoCo) or averaging gradients with peers that run the same model.
"""

import os

os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")

from swarm_node.network import hivemind_patch  # noqa: E402

hivemind_patch.apply()
