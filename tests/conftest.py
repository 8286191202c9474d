"""Fixtures shared across test packages (imports stay inside them: the GPU machine runs the
trainer tests without the serving stack)."""

from __future__ import annotations

import pytest


@pytest.fixture
def standin():
    """A running SGLang stand-in server: ``(url, state)`` (tests/inference/sglang_standin.py)."""
    from tests.inference.sglang_standin import serve

    with serve() as (url, state):
        yield url, state
