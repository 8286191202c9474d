"""Markers shared by the sandbox tests of ``tests/envs``."""

from __future__ import annotations

import os

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="sandboxes need root (see docs/security.md)"
)
"""Skip a test that starts real sandboxes (namespaces, cgroups) when not running as root."""
