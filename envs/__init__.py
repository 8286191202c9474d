"""Environment role: reward functions (verifiers) and tool environments."""
