"""Small helpers for lists."""
