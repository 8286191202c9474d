"""Trainer role: backends (PyTorch, Megatron-core) behind one narrow protocol:
forward_backward, optim_step, save, load, export_weights."""
