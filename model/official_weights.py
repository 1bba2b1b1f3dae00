"""Loading official InternImage checkpoints (docs/model.md §5).

Our module names are the official key names, so loading needs no renaming: only unwrapping
(``model`` / ``module`` / ``state_dict``, ``student.`` and DDP's ``module.`` prefixes), strict
backbone checks, and the head policy (keep the checkpoint's head, remap its rows, or replace it).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "module", "state_dict")
CLASSIFIER_KEYS = ("head.weight", "head.bias")


def read_weights(path: str | Path) -> Mapping:
    """A weights file as a mapping: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True)`` (no code in a checkpoint runs)."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"{path} is a safetensors file: pip install safetensors") from exc
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(checkpoint: Mapping) -> dict[str, Tensor]:
    """The weights inside an official (or DDP / distillation) checkpoint, with bare key names."""
    state = checkpoint
    while True:
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if any(key.startswith("student.") for key in state):
        state = {key[len("student."):]: value for key, value in state.items() if key.startswith("student.")}
    elif state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value for key, value in state.items() if isinstance(value, Tensor)}


def _describe(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _head_rows(state: dict[str, Tensor], class_indices: Sequence[int]) -> None:
    rows = torch.as_tensor(list(class_indices), dtype=torch.long)
    available = state["head.weight"].shape[0]
    if rows.numel() and (rows.min() < 0 or rows.max() >= available):
        raise ValueError(f"class_indices must lie in 0..{available - 1} (the checkpoint's head has "
                         f"{available} classes), got min {int(rows.min())}, max {int(rows.max())}")
    for key in CLASSIFIER_KEYS:
        state[key] = state[key].index_select(0, rows)


def load_pretrained(model: nn.Module, source: str | Path | Mapping, class_indices: Sequence[int] | None = None) -> None:
    """Loads official-format weights into ``model`` in place.

    A model built on the meta device takes the checkpoint's tensors without copying (the fast
    path ``create_model(pretrained=...)`` uses, skipping random initialisation).

    Every backbone key must be present with its shape; otherwise ValueError names the keys. The
    final Linear (``head``) follows the checkpoint when sizes agree, takes the rows ``class_indices``
    when given (21841 → 1000 remap), and is otherwise left freshly initialised with a warning.
    """
    state = extract_state_dict(read_weights(source) if isinstance(source, (str, Path)) else source)
    own = model.state_dict()
    features_only = getattr(model, "features_only", False)
    head_modules = set(model.head_module_names())
    if features_only:
        state = {k: v for k, v in state.items() if k.split(".")[0] not in head_modules}

    missing = [k for k in own if k not in state and k not in CLASSIFIER_KEYS]
    unexpected = [k for k in state if k not in own and k not in CLASSIFIER_KEYS]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__} ({model.arch}):\n"
                         f"  missing keys: {_describe(missing) or 'none'}\n"
                         f"  unexpected keys: {_describe(unexpected) or 'none'}\n"
                         "Check the variant name and architecture overrides.")
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k not in CLASSIFIER_KEYS and state[k].shape != own[k].shape]
    if mismatched:
        raise ValueError("checkpoint shapes differ from the model:\n  " + "\n  ".join(mismatched))

    on_meta = any(t.is_meta for t in own.values())
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    load_head = not features_only and _classifier_fits(model, state, own, class_indices)
    model.load_state_dict({k: v for k, v in state.items() if load_head or k not in CLASSIFIER_KEYS},
                          strict=False, assign=on_meta)
    if on_meta and not features_only and not load_head and "head.weight" in own:
        model.reset_classifier(model.num_classes)  # a fresh head, on the weights' device


def _classifier_fits(model: nn.Module, state: dict[str, Tensor], own: dict[str, Tensor],
                     class_indices: Sequence[int] | None) -> bool:
    """Whether the checkpoint's head (after the optional row remap) can load; warns when it cannot."""
    has_head = all(k in state for k in CLASSIFIER_KEYS)
    if class_indices is not None:
        if not has_head:
            raise ValueError("class_indices given, but the checkpoint has no head.weight/head.bias")
        _head_rows(state, class_indices)
    if not all(k in own for k in CLASSIFIER_KEYS):  # num_classes=0: pooled features out, no classifier
        return False
    if has_head and all(state[k].shape == own[k].shape for k in CLASSIFIER_KEYS):
        return True
    found = tuple(state["head.weight"].shape) if has_head else "none"
    log.warning("checkpoint head %s does not fit the model's %d classes: the head stays freshly "
                "initialised (pass class_indices to remap classes instead)", found, own["head.weight"].shape[0])
    return False
