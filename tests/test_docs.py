"""The README stays true: its Quick start, and its configuration reference
matches the settings the services really read."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_start_is_make_demo_and_make_test():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^(make \w+)", quick, flags=re.MULTILINE)
    assert commands == ["make demo", "make test"]


def test_configuration_reference_matches_the_settings():
    generated = subprocess.run([sys.executable, "tools/settings_reference.py"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout.strip()
    readme = (REPO / "README.md").read_text()
    assert generated in readme, "README's settings reference is stale: run `python tools/settings_reference.py --write`"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
