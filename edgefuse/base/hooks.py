"""User code named as `module.path:function` (a model factory, a data loader hook), imported the same way for both:
the current folder first on the path, as `python -m` would have it, and one line naming the hook when it fails."""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable

from .errors import EdgefuseError, first_line


def is_hook(text: str) -> bool:
    """`module.path:function`: a colon with a dotted Python name on its left (so `C:\\data` or `./x:y` is a path)."""
    mod, sep, fn = text.partition(":")
    return bool(sep) and bool(fn) and all(p.isidentifier() for p in mod.split(".")) and fn.isidentifier()


def import_callable(spec: str, what: str) -> Callable:
    """The function `spec` names, imported with the current folder on sys.path."""
    if not is_hook(spec):
        raise EdgefuseError(f"{what} '{spec}' is not of the form module.path:function")
    mod_name, fn_name = spec.split(":", 1)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        with user_code(spec, what):
            fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise EdgefuseError(f"cannot import {what} '{spec}': {first_line(e)}") from None
    except Exception as e:  # the user's module raised while importing
        raise EdgefuseError(f"importing {what} '{spec}' raised {type(e).__name__}: {first_line(e)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    if not callable(fn):
        raise EdgefuseError(f"{what} '{spec}' is not callable")

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with user_code(spec, what):
            return fn(*args, **kwargs)
    return guarded


@contextlib.contextmanager
def user_code(spec: str, what: str):
    """Run the user's code so that it cannot pass for edgefuse's own outcome: what it prints goes to stderr (stdout
    carries the commands' JSON), and a `sys.exit()` in it is a one-line error, never a silent exit 0."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SystemExit as e:
        raise EdgefuseError(f"{what} '{spec}' exited (SystemExit({e.code!r})) instead of returning") from None


def optional(module: str, package: str, why: str):
    """A library only some paths need (POT for OT matching, scikit-learn for the digits set), imported when used:
    missing, it is the user's one-line fix, not an internal error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgefuseError(f"{why} needs the Python package {package}: pip install {package}") from None
