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


class CheckpointError(ValueError):
    """A checkpoint file that cannot give back its model (unreadable, inconsistent, or non-finite weights)."""


def check_finite_weights(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """CheckpointError naming the tensors that hold NaN or infinite values (a diverged or corrupted model)."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{where}: the weights hold NaN or infinite values ({', '.join(bad[:3])}{more}); "
                              "the model diverged or the file is damaged: use an earlier checkpoint")


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
    """Rebuild the model of a checkpoint (eval mode) -> (model, payload without the weights).

    Raises FileNotFoundError, or CheckpointError (a ValueError) with one line saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one clear message
        raise CheckpointError(f"{path}: not a readable h2ot checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path}: not an h2ot checkpoint (missing model_config/state_dict)")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema {payload.get('schema_version')} != supported "
                              f"{SCHEMA_VERSION}")
    model = _build(payload, path)
    check_finite_weights(payload["state_dict"], str(path))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: the weights do not fit the model its model_config describes ({detail})") \
            from None
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}


def _build(payload: dict[str, Any], path: Path) -> nn.Module:
    """The model a payload's model_config describes, after checking the types a file could get wrong."""
    from h2ot.config import ConfigError
    from h2ot.models import build_model

    config, weights = payload["model_config"], payload["state_dict"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model_config is a {type(config).__name__}, not a mapping of model settings")
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: state_dict is not a mapping of names to tensors")
    try:
        return build_model(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: model_config does not describe a model ({e})") from None
