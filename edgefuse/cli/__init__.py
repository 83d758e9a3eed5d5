"""The command line: a thin click layer over the jobs."""
from .main import cli, main

__all__ = ["cli", "main"]
