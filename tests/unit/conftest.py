"""Fixtures shared by the unit tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
