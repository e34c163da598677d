"""Argument types shared by the project's command-line tools (tools/crosscheck.py, tools/moe_round.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of `kind` >= minimum (a world of 0 ranks or 0 rounds cannot run)."""

    def parse(text: str) -> float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse
