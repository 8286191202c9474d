"""mopd: post-training of mixture-of-experts language models with RL and
Multi-Teacher On-Policy Distillation (MOPD), as in the MiMo-V2-Flash report.

Packages: ``mopd`` (contracts, math, config, scheduler, driver, CLI), and the role
packages ``rollout``, ``teachers``, ``envs``, ``trainer``, which never import each other.
"""

__version__ = "0.1.0"
