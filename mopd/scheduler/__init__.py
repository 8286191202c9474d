"""The fine-grained data scheduler: prompts out to rollout, scored samples into a durable
Redis stream, token-balanced micro-batches out to trainers."""
