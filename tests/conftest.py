"""Shared fixtures: a real server on real sockets (port 0), and real clients for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Agents and servers started as real processes by tests import the package from this checkout.
os.environ.setdefault("PYTHONPATH", str(Path(__file__).parent.parent))


@pytest.fixture
def anyio_backend() -> str:
    return "trio"
