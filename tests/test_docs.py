"""Docs that are generated or quoted from elsewhere stay in step with their source."""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_error_table_is_current() -> None:
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import error_table

    with open(os.path.join(ROOT, "docs", "ERRORS.md"), encoding="utf-8") as f:
        assert f.read() == error_table.render(), "regenerate with: python tools/error_table.py > docs/ERRORS.md"


def test_ci_runs_the_readme_test_command() -> None:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert test_command.strip() in f.read()
