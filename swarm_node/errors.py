"""The base of every operator-mistake exception. The CLI prints its message as one `error:` line (exit 2)."""


class OperatorError(Exception):
    """A mistake the operator can fix (config, identity, address, model, task); the message says how."""
