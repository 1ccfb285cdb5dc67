"""What mlx_sa3's command lines share: every error is one line on stderr, with exit status 2.

Standard library only: ``platform`` (imported before MLX, for the BLAS preload) uses it too.
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other error (argparse prints its whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(message: str, status: int = 2) -> int:
    """Print ``error: message`` on stderr and return ``status`` (the command's exit status)."""
    print(f"error: {message}", file=sys.stderr)
    return status
