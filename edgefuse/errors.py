"""Errors a user can cause. The CLI prints them as one line; anything else is a bug."""


class EdgefuseError(Exception):
    """Base class for errors caused by input (files, models, options), not by edgefuse itself."""


class UnsupportedModelError(EdgefuseError):
    """The traced graph holds an operation the permutation spec cannot handle safely."""

    def __init__(self, node: str, op: str, why: str = "not supported yet") -> None:
        self.node, self.op = node, op
        super().__init__(f"unsupported model: node '{node}' (op {op}): {why}")
