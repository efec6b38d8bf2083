"""The operator's commands behind `swarm-node` (swarm_node/cli.py): the local swarm (launcher.py), `status`,
`report` and `doctor`. They drive node processes or read what nodes wrote (node.json, the run logs); nothing here
runs inside a node."""
