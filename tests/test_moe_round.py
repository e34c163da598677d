"""tools/moe_round.py: arguments that cannot run are refused with argparse's usage error, and a round of
N = 0 tokens per rank (valid: a rank may hold no tokens) runs and passes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import moe_round  # noqa: E402


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "0"], "argument --ranks: must be >= 1, got 0"),
        (["--ranks", "-2"], "argument --ranks: must be >= 1, got -2"),
        (["--iters", "0"], "argument --iters: must be >= 1, got 0"),
        (["--tokens", "-1"], "argument --tokens: must be >= 0, got -1"),
        (["--experts", "4", "--ranks", "2", "--topk", "5"], "--topk=5 is more than --experts=4"),
    ],
)
def test_impossible_arguments_are_a_usage_error(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        moe_round.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_round_of_no_tokens(capsys) -> None:
    argv = ["--ranks", "2", "--tokens", "0", "--hidden", "16", "--ffn", "8", "--experts", "4", "--topk", "2"]
    assert moe_round.main([*argv, "--iters", "1"]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out
    assert moe_round._rel_err(torch.zeros(0, 16), torch.zeros(0, 16)) == 0.0
