"""Named choices behind one lookup: backbones, model presets, config kinds, pruning and recovering strategies.

A config names a choice by a string (`model.backbone: mixste`, `model.tpm: dpc_knn`); a `Registry` maps the names
to what they build and answers an unknown name with one message that says which key was wrong and what it may be:

    BACKBONES = Registry("backbone", key="model.backbone")

    @BACKBONES.register("mixste")
    class MixSTE(nn.Module): ...

    BACKBONES.get("mixtse")  # ConfigError: model.backbone: unknown backbone 'mixtse'; known: dstformer, mixste
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key (re-exported by h2ot.config)."""


class Registry(Generic[T]):
    """Name -> object, read like a dict (`name in r`, `r[name]`, `sorted(r)`, `r.items()`); `get` and `r[name]`
    raise ConfigError naming `key` and the known names instead of a KeyError."""

    def __init__(self, what: str, key: str | None = None) -> None:
        self.what = what  # "backbone", "pruning strategy", ...
        self.key = key  # the config key that names it ("model.backbone"); None: no key prefix in errors
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """`r.register("x", obj)`, or `@r.register("x")` on a class or function. Re-registering a name replaces it
        (so a module reloaded in a test or a probe can register its variant again)."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def decorator(target: T) -> T:
            self._items[name] = target
            return target

        return decorator

    def get(self, name: str, key: str | None = None) -> T:
        """The object registered as `name`; an unknown name is a ConfigError naming `key` (default: the
        registry's own, e.g. `space.tpm[1]` for a list of names checked against `model.tpm`'s registry)."""
        if name not in self._items:
            key = key or self.key
            prefix = f"{key}: " if key else ""
            raise ConfigError(f"{prefix}unknown {self.what} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"
