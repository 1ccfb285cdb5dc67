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


def whole_number_in(low: int, high: int | None = None):
    """An argparse ``type``: a whole number in ``low..high`` (no upper bound with None); anything else is a one-line
    usage error that says the range, where ``type=int`` let a value through that failed later, with a traceback."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = None
        if number is None or number < low or (high is not None and number > high):
            wanted = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {wanted}")
        return number

    return parse


def fail(message: str, status: int = 2) -> int:
    """Print ``error: message`` on stderr and return ``status`` (the command's exit status)."""
    print(f"error: {message}", file=sys.stderr)
    return status
