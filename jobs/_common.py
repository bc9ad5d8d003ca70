"""Helpers shared by the job entry points: clear one-line errors instead of tracebacks, common flags."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


def friendly_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Turn expected errors (bad config, missing file, bad input) into one line on stderr and exit 2."""
    from cluster import ClusterError
    from h2ot.config import ConfigError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError, ClusterError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def add_output_flags(parser: argparse.ArgumentParser, json_help: str = "print one JSON object") -> None:
    """--json and --verbose, the same on every job."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def print_figures(figures: dict, as_json: bool, width: int = 24) -> None:
    """A benchmark's figures: one JSON object (--json), else one `key: value` line each, keys right-aligned."""
    import json

    if as_json:
        print(json.dumps(figures))
        return
    for key, value in figures.items():
        print(f"{key:>{width}}: {value}")


def shard_manifest(data: str | Path) -> dict:
    """The manifest of a shard folder; a malformed one (not an object, paths outside train/ and test/, another
    schema) is a UserError naming the file, not a traceback."""
    from pipelines.shards import load_manifest

    try:
        return load_manifest(data)
    except ValueError as e:
        raise UserError(str(e)) from None


def require_shards(data: str | Path) -> None:
    """A UserError unless `data` is a folder (the shards of `h2ot preprocess`)."""
    if not Path(data).is_dir():
        raise UserError(f"--data {data}: no such folder (run `h2ot preprocess --out {data}` first)")


MAX_ERROR_CHARS = 200


def one_line(error: Exception, limit: int = MAX_ERROR_CHARS) -> str:
    """The first line of an error message, shortened (torch's unpickling errors run to many lines)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, ModelConfig) of an h2ot checkpoint; every way it can be unreadable is one UserError."""
    import torch

    from h2ot.checkpoint import load_checkpoint
    from h2ot.config import ConfigError, config_from_dict

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to torch here; use --device cpu")
    try:
        model, payload = load_checkpoint(path)
        cfg = config_from_dict({"kind": "model", "model": payload["model_config"]}).model
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except (ValueError, ConfigError, RuntimeError, KeyError) as e:
        if "Weights only load failed" in str(e):  # torch's advice to unpickle arbitrary code is not ours to give
            raise UserError(
                f"--checkpoint {path}: cannot load the model (not a file written by h2ot's save_checkpoint: it holds "
                "objects that a weights-only load refuses)"
            ) from None
        raise UserError(f"--checkpoint {path}: cannot load the model ({one_line(e)})") from None
    return model, cfg
