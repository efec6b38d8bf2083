"""The node layer: one swarm node's lifecycle and round loop (`Node`, node/lifecycle.py), and a module for each of
its concerns: joining the swarm (join.py), node.json (peers_file.py), memory (memory.py), checkpoint state
(state.py), the run log (runlog.py), the metrics line (metrics.py) and the generation phase (generate.py).
"""

from swarm_node.node.join import NetworkError, check_multiaddrs
from swarm_node.node.lifecycle import MAX_ROUND_FAILURES_IN_A_ROW, Node

__all__ = ["Node", "NetworkError", "check_multiaddrs", "MAX_ROUND_FAILURES_IN_A_ROW"]
