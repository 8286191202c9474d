"""Rollout role: inference servers that speak SGLang's HTTP API (SGLang itself on GPU
clusters, the embedded engine everywhere else) and the Ray actors that own them."""
