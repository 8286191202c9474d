"""Megatron-core trainer backend (``trainer.backend: megatron``).

    parallel     torch.distributed + Megatron parallel_state from a TrainerConfig
    model        a Megatron GPTModel/MoE built from an HF config (MiMo-V2-Flash, Qwen3-MoE)
    convert      HF <-> Megatron weights, tensor/expert-parallel aware, exact both ways
    cpu_compat   the CPU/gloo shims (applied only without CUDA)
    backend      ``MegatronTrainer``, the Trainer protocol on top of all of it

Importing this package does not import Megatron; ``trainer.megatron.backend`` does.
"""
