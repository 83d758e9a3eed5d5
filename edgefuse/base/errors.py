"""Errors a user can cause. The CLI prints them as one line; anything else is a bug. Warnings: a setting that
changes nothing, or a stored file that had to be replaced, said once per process as one line."""
import sys

_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """One line on stderr, the first time this message comes up in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"edgefuse: warning: {message}", file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries' errors run to many lines), or its type name when the
    message is empty, so a one-line error never ends in an IndexError of its own."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class EdgefuseError(Exception):
    """Base class for errors caused by input (files, models, options), not by edgefuse itself."""


class UnsupportedModelError(EdgefuseError):
    """The traced graph holds an operation the permutation spec cannot handle safely."""

    def __init__(self, node: str, op: str, why: str = "not supported yet") -> None:
        self.node, self.op = node, op
        super().__init__(f"unsupported model: node '{node}' (op {op}): {why}")
