"""Helpers shared by the job entry points: clear one-line errors instead of tracebacks."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


def friendly_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """Turn expected errors (bad config, missing file, bad input) into one line on stderr and exit 2."""
    from h2ot.config import ConfigError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs)
        except (UserError, ConfigError, FileNotFoundError) as e:
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
