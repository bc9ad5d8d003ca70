"""Self-describing model checkpoints: the model config as a plain dict, a schema version, the weights
and free-form metadata (shard manifest hash, git revision, metrics). Loaded with weights_only=True, so a
checkpoint file cannot run code."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from h2ot.config import ModelConfig

SCHEMA_VERSION = 1


def save_checkpoint(path: str | Path, model: nn.Module, cfg: ModelConfig, meta: dict[str, Any] | None = None) -> Path:
    """Write {schema_version, model_config, state_dict, meta} atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    payload = {
        "schema_version": SCHEMA_VERSION,
        "model_config": dataclasses.asdict(cfg),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode) -> (model, payload without the weights)."""
    from h2ot.models import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear message
        raise ValueError(f"{path}: not a readable h2ot checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path}: not an h2ot checkpoint (missing model_config/state_dict)")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: checkpoint schema {payload.get('schema_version')} != supported {SCHEMA_VERSION}")
    model = build_model(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}
