"""`make test-fast` names test files that exist, and none of them starts a service process."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fast_tests_exist_and_start_no_services():
    makefile = (ROOT / "Makefile").read_text()
    block = re.search(r"^FAST_TESTS := (.*?)\n(?=\S)", makefile, re.S | re.M).group(1)
    files = block.replace("\\", " ").split()
    assert len(files) >= 10 and "test-fast:" in makefile
    for name in files:
        text = (ROOT / name).read_text()
        assert "ServiceProcess" not in text and "start_gateway" not in text, name
