"""Model helpers shared by roles: tiny random checkpoints for tests and quick runs."""
