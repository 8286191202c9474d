"""The served model's weights: in-place updates, their version, and memory release.

SGLang's ``/update_weights_from_disk`` and ``/update_weights_from_tensors`` copy new values
into the parameters the model already has, so requests in flight continue on the new weights
with their KV cache kept. Tensors may come under the served model's ``state_dict`` names or
under checkpoint (hub) names, which are converted exactly as a disk load converts them.
``release`` moves the weights to host memory (SGLang's ``/release_memory_occupation``) and
``resume`` moves them back. Everything here runs on the engine thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["WeightLoader"]

_OK = "Succeeded to update model weights."


class WeightLoader:
    """Updates ``model`` in place and names the version it serves.

    ``path``: where the weights served now came from; ``version``: the name the trainer gave
    them (every ``Output`` carries it); ``released``: weights are in host memory.
    """

    def __init__(
        self, model: torch.nn.Module, path: str, version: str, device: torch.device
    ) -> None:
        self.model = model
        self.dtype = next(model.parameters()).dtype
        self.path = path
        self.version = version
        self.device = device
        self.released = False

    def from_disk(self, model_path: str, weight_version: str | None) -> tuple[bool, str]:
        """Reload every weight from an HF checkpoint dir."""
        from transformers import AutoModelForCausalLM

        path = Path(model_path)
        if not path.is_dir():
            return False, f"model_path {model_path!r} is not a directory"
        try:
            fresh = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
        except Exception as exc:
            return False, f"Failed to load weights from {model_path}: {exc}"
        ok, msg = self.copy(fresh.state_dict().items(), require_all=True)
        if not ok:
            return ok, msg
        self.path = str(path)
        if weight_version is not None:
            self.version = str(weight_version)
        return True, _OK

    def from_tensors(
        self, named: list[tuple[str, torch.Tensor]], weight_version: str | None
    ) -> tuple[bool, str]:
        """Overwrite the named parameters (``state_dict`` or checkpoint names)."""
        try:
            internal = self.to_state_dict_names(named)
        except ValueError as exc:
            return False, str(exc)
        ok, msg = self.copy(internal, require_all=False)
        if ok and weight_version is not None:
            self.version = str(weight_version)
        return ok, msg

    def to_state_dict_names(
        self, named: list[tuple[str, torch.Tensor]]
    ) -> list[tuple[str, torch.Tensor]]:
        """Accept checkpoint (hub) names too, as SGLang does: convert them as loading would.

        transformers renames and fuses some checkpoint tensors at load time (e.g. per-expert
        MoE weights into one packed tensor). Tensors under checkpoint names are merged into
        the current weights in checkpoint naming and loaded back through ``from_pretrained``,
        which applies exactly the conversions a disk load applies.
        """
        state = self.model.state_dict()
        if all(name in state for name, _ in named):
            return named
        import tempfile

        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import (
            remove_tied_weights_from_state_dict,
            revert_weight_conversion,
        )

        hub = dict(
            revert_weight_conversion(
                self.model, remove_tied_weights_from_state_dict(dict(state), self.model)
            )
        )
        unknown = [name for name, _ in named if name not in hub and name not in state]
        if unknown:
            raise ValueError(
                f"unknown parameter names {unknown[:8]}{'...' if len(unknown) > 8 else ''}; "
                f"expected checkpoint names (e.g. {list(hub)[:3]}) or state_dict names"
            )
        merged = {name: t.detach().to("cpu").contiguous() for name, t in hub.items()}
        merged.update({n: t.detach().to("cpu").contiguous() for n, t in named if n in hub})
        with tempfile.TemporaryDirectory() as tmp:
            save_file(merged, f"{tmp}/model.safetensors", metadata={"format": "pt"})
            self.model.config.save_pretrained(tmp)
            fresh = AutoModelForCausalLM.from_pretrained(tmp, dtype=self.dtype)
        converted = dict(fresh.state_dict())
        converted.update({n: t for n, t in named if n in state and n not in hub})
        return list(converted.items())

    def copy(
        self, named: Iterable[tuple[str, torch.Tensor]], require_all: bool
    ) -> tuple[bool, str]:
        """Copy tensors under ``state_dict`` names into the model, after checking names and
        shapes (``require_all``: every parameter must be given)."""
        state = self.model.state_dict()
        named = list(named)
        unknown = [n for n, _ in named if n not in state]
        if unknown:
            return False, (
                f"unknown parameter names {unknown[:8]}{'...' if len(unknown) > 8 else ''}; "
                f"expected names of the served model's state_dict, e.g. {list(state)[:3]}"
            )
        bad = [(n, tuple(t.shape)) for n, t in named if tuple(t.shape) != tuple(state[n].shape)]
        if bad:
            return (
                False,
                "shape mismatch (name, got, expected): "
                f"{[(n, shape, tuple(state[n].shape)) for n, shape in bad[:4]]}",
            )
        if require_all:
            missing = set(state) - {n for n, _ in named}
            if missing:
                return False, f"checkpoint lacks {sorted(missing)[:8]}"
        with torch.no_grad():
            for name, tensor in named:
                state[name].copy_(tensor.to(device=state[name].device, dtype=state[name].dtype))
        return True, _OK

    def release(self) -> None:
        """Move the weights to host memory (a no-op on CPU)."""
        if self.device.type != "cpu":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.released = True

    def resume(self) -> None:
        """Move the weights back onto the engine's device."""
        if self.device.type != "cpu":
            self.model.to(self.device)
        self.released = False
