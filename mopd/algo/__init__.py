"""Pure math of the platform (algorithms.md)."""
