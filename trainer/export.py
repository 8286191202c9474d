"""Hand the student's weights to rollout servers: HF safetensors on disk, or tensors in memory.

Disk (``export_hf_checkpoint`` / ``write_hf_checkpoint``): a directory any Hugging Face loader
(``AutoModelForCausalLM.from_pretrained``, SGLang's ``/update_weights_from_disk``) reads:

    config.json                         the model config (dtype set to the exported dtype)
    generation_config.json              copied from the source checkpoint, if it has one
    tokenizer files, chat template      copied from the source checkpoint
    *.py                                remote-code modules of the source, if any
    model-0000X-of-0000Y.safetensors    weights in the *checkpoint* naming (the names on the
    model.safetensors.index.json        hub: transformers' load-time conversions, e.g. fused
                                        expert tensors, are reverted exactly as save_pretrained
                                        does), sharded by ``max_shard_size``; the index is
                                        written even for a single shard, so there is one layout
    mopd_version.json                   {"version": V}: the policy version of these weights
    COMMITTED                           written last (trainer.checkpoint protocol)

The directory is written into a hidden temp sibling and renamed into place once complete
(``trainer.checkpoint.atomic_dir``): a server never sees half a checkpoint.

Memory (``named_tensors_for_handoff`` + ``serialize_named_tensors``): the same-host fast path.
The list of ``(name, tensor)`` pairs is what an in-process engine loads directly; its
``ForkingPickler`` bytes are the per-rank payload of SGLang's ``/update_weights_from_tensor``
(``serialized_named_tensors``, one entry per TP rank; SGLang's ``MultiprocessingSerializer``
produces the same bytes and the HTTP client base64-encodes them). CUDA tensors travel as CUDA
IPC handles; CPU tensors as shared-memory files, which needs torch's ``file_system`` sharing
strategy in the sending process. Either way the receiver maps the sender's memory, so the
handoff tensors are private copies (never the live parameters) and the sender must keep them
alive until the receiver has loaded them.

Names: ``naming="checkpoint"`` gives the hub names (what SGLang's model loaders expect);
``naming="state_dict"`` the transformers module names (what ``model.load_state_dict`` and the
project's embedded engine expect).
"""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import atomic_dir, require_committed

__all__ = [
    "INDEX_FILE",
    "VERSION_FILE",
    "checkpoint_state_dict",
    "export_hf_checkpoint",
    "handoff_state_dict",
    "named_tensors_for_handoff",
    "read_export_version",
    "serialize_named_tensors",
    "write_hf_checkpoint",
]

VERSION_FILE = "mopd_version.json"
INDEX_FILE = "model.safetensors.index.json"
NAMINGS = ("checkpoint", "state_dict")

# Files of a source checkpoint that travel with exported weights (besides config + weights).
_COPIED = re.compile(
    r"^(generation_config\.json|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
    r"vocab\.(json|txt)|merges\.txt|spiece\.model|.*\.tiktoken|chat_template.*|"
    r"preprocessor_config\.json|[^/]+\.py)$"
)


def _keep_fp32(model: Any) -> list[str]:
    names = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return sorted(names)


def _cast(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None, keep_fp32: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Cast floating tensors to ``dtype``, except those the model keeps in fp32 (e.g. MiMo's
    router weights and selection bias), as ``from_pretrained`` would load them."""
    keep = [k for k in keep_fp32 if k]
    out = {}
    for name, t in state_dict.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point() and not any(k in name for k in keep):
            t = t.to(dtype)
        out[name] = t
    return out


def checkpoint_state_dict(
    model: Any,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The model's tensors under their checkpoint (hub) names, tied duplicates removed.

    Args:
        model: a transformers ``PreTrainedModel`` (its conversion mapping names the weights).
        state_dict: the full, unsharded state dict to use instead of ``model.state_dict()``
            (e.g. gathered from FSDP shards).
        dtype: cast floating tensors (fp32-pinned modules excepted); None keeps them.
    """
    from transformers.modeling_utils import (
        remove_tied_weights_from_state_dict,
        revert_weight_conversion,
    )

    sd = _cast(
        state_dict if state_dict is not None else model.state_dict(), dtype, _keep_fp32(model)
    )
    sd = remove_tied_weights_from_state_dict(sd, model)
    return dict(revert_weight_conversion(model, sd))


def _owning(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it covers its whole storage, else a compact copy: safetensors refuses
    partial views (e.g. one expert's slice of a fused expert tensor)."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _single_shard_to_indexed(directory: Path) -> None:
    """huggingface_hub writes ``model.safetensors`` for one shard; give it the indexed name."""
    single = directory / "model.safetensors"
    if not single.exists() or (directory / INDEX_FILE).exists():
        return
    from safetensors import safe_open

    name = "model-00001-of-00001.safetensors"
    with safe_open(str(single), "pt") as f:
        keys = list(f.keys())
    single.rename(directory / name)
    total = (directory / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(sorted(keys), name)}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_source_files(source_dir: Path, dest: Path) -> None:
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"source checkpoint {source_dir} is not a directory; pass the folder the model was "
            "loaded from (tokenizer and generation config are copied from it)"
        )
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and _COPIED.match(f.name):
            shutil.copy2(f, dest / f.name)


def write_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    config: Any,
    out_dir: str | Path,
    version: int,
    *,
    source_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write checkpoint-named tensors + config as an HF directory, atomically.

    Backend-neutral: the Megatron backend calls it with tensors it converted to hub names.

    Args:
        state_dict: full tensors in checkpoint (hub) naming, any device.
        config: a transformers ``PretrainedConfig`` (saved with ``save_pretrained``) or a
            JSON-serialisable dict (written as ``config.json``).
        out_dir: final directory; replaced atomically if it exists.
        version: policy version stored in ``mopd_version.json`` and the commit marker.
        source_dir: checkpoint to copy tokenizer files, generation config and remote code from.
        tokenizer_dir: a separate tokenizer folder whose files are copied over those of
            ``source_dir`` (``ModelConfig.tokenizer_path``).
        max_shard_size: largest shard (bytes or a string such as "2GB").
    """
    from huggingface_hub import save_torch_state_dict

    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version={version!r} must be a non-negative int")
    if not state_dict:
        raise ValueError("state_dict is empty; nothing to export")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, meta={"version": version, "kind": "hf_export"}) as tmp:
        for src in (source_dir, tokenizer_dir):
            if src is not None:
                _copy_source_files(Path(src), tmp)
        cpu = {k: _owning(v.detach().to("cpu")) for k, v in state_dict.items()}
        save_torch_state_dict(
            cpu,
            tmp,
            max_shard_size=max_shard_size,
            metadata={"format": "pt"},
            force_contiguous=True,
        )
        _single_shard_to_indexed(tmp)
        if isinstance(config, Mapping):
            (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        else:
            config.save_pretrained(str(tmp))
        (tmp / VERSION_FILE).write_text(json.dumps({"version": version}) + "\n")
    return out_dir


def export_hf_checkpoint(
    model: Any,
    out_dir: str | Path,
    version: int,
    *,
    source_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Export a transformers model (or a full state dict of it) as an HF directory, atomically.

    ``dtype`` casts floating weights for serving (e.g. bf16) and is recorded in config.json;
    modules the model pins to fp32 stay fp32. See ``write_hf_checkpoint`` for the rest.
    """
    sd = checkpoint_state_dict(model, state_dict=state_dict, dtype=dtype)
    config = copy.deepcopy(model.config)
    if dtype is not None:
        config.dtype = dtype
    return write_hf_checkpoint(
        sd,
        config,
        out_dir,
        version,
        source_dir=source_dir,
        tokenizer_dir=tokenizer_dir,
        max_shard_size=max_shard_size,
    )


def read_export_version(path: str | Path) -> int:
    """Policy version of a committed export directory."""
    path = require_committed(path)
    return int(json.loads((path / VERSION_FILE).read_text())["version"])


def named_tensors_for_handoff(
    model: Any,
    *,
    naming: str = "checkpoint",
    dtype: torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> list[tuple[str, torch.Tensor]]:
    """Private copies of the weights as ``[(name, tensor), ...]`` for a same-host engine.

    Tensors stay on the model's device (CUDA stays CUDA: no host round trip). ``naming`` is
    ``checkpoint`` (hub names, SGLang) or ``state_dict`` (module names, ``load_state_dict``).
    """
    sd = handoff_state_dict(model, naming=naming, dtype=dtype, state_dict=state_dict)
    # clone: the receiver maps this memory, so it must not alias a live parameter.
    return [(name, t.detach().contiguous().clone()) for name, t in sd.items()]


def handoff_state_dict(
    model: Any,
    *,
    naming: str = "checkpoint",
    dtype: torch.dtype | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Mapping[str, torch.Tensor]:
    """The weights under ``naming`` in the serving dtype; tensors may alias the model's own
    parameters (copy them before another process maps them)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming={naming!r}; accepted values: {', '.join(NAMINGS)}")
    if naming == "checkpoint":
        return checkpoint_state_dict(model, state_dict=state_dict, dtype=dtype)
    source = state_dict if state_dict is not None else model.state_dict()
    return _cast(source, dtype, _keep_fp32(model))


def serialize_named_tensors(named: Sequence[tuple[str, torch.Tensor]]) -> bytes:
    """``ForkingPickler`` bytes of ``[(name, tensor), ...]``: one ``serialized_named_tensors``
    entry of SGLang's ``/update_weights_from_tensor`` (before base64).

    The receiver maps the tensors' memory: keep ``named`` alive until it has loaded them.
    CPU tensors need ``torch.multiprocessing.set_sharing_strategy("file_system")`` in this
    process (file descriptors cannot cross an HTTP request).
    """
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    pairs = [(str(n), t) for n, t in named]
    if not pairs or not all(isinstance(t, torch.Tensor) for _, t in pairs):
        raise ValueError("named must be a non-empty sequence of (name, tensor) pairs")
    if any(not t.is_cuda for _, t in pairs) and tmp.get_sharing_strategy() != "file_system":
        raise ValueError(
            "CPU tensors cross processes only as shared-memory files: call "
            "torch.multiprocessing.set_sharing_strategy('file_system') in the sending process "
            f"(now {tmp.get_sharing_strategy()!r}) or move the tensors to CUDA"
        )
    buf = io.BytesIO()
    ForkingPickler(buf).dump(pairs)
    return buf.getvalue()
