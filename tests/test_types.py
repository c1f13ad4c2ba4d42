"""The package's type hints are checked, not decoration: mypy must pass on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_passes_on_the_package() -> None:
    root = Path(__file__).parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "trioprovider"], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
