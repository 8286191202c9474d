"""Fixtures shared across test packages."""

from __future__ import annotations

import pytest

from tests.inference.sglang_standin import serve


@pytest.fixture
def standin():
    """A running SGLang stand-in server: ``(url, state)`` (tests/inference/sglang_standin.py)."""
    with serve() as (url, state):
        yield url, state
