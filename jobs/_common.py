"""Helpers shared by the job entry points: clear one-line errors instead of tracebacks, common flags."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path


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
