"""The model config (`ModelConfig`, its presets) and the YAML loader every config kind shares: `base:` files,
`--set a.b=value` overrides, typed dataclasses with every key checked.

Every YAML file names its `kind`. h2ot knows `model`; the run settings live with the jobs that use them and
register their kinds on import: `train` in jobs/settings.py (optimizer, loss weights, scaling, run names;
`load_train_config`), `tune` in jobs/tune_search.py, `preprocess` in pipelines/config.py.

The dotted override keys mirror the YAML nesting (`--set optim.epochs=2`, `--set model.schedule=[[3,81]]`). A file
may name a `base` file (a path relative to it) and change only a few keys: mappings merge key by key, lists and
values replace (see `resolve_bases`). Configs travel to Ray as plain dicts (`dataclasses.asdict`) and are rebuilt
with `config_from_dict` on the other side.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from h2ot.registry import ConfigError, Registry

# --------------------------------------------------------------------------------------------- model
_PRESETS: dict[str, dict[str, Any]] = {
    # Paper size (MixSTE CVPR'22): 8 loops of spatial + temporal blocks, 512 wide, 243 frames.
    "mixste": dict(backbone="mixste", frames=243, dim=512, depth=8, heads=8, mlp_ratio=2.0,
                   schedule=[[2, 81], [4, 41], [6, 21]]),
    # CPU-size presets: each is the model of the configs of the same name (configs/h2ot_<name>.yaml is the preset,
    # configs/<name>.yaml the preset with `schedule: []`). The schedules and TRMs of mixste_small and
    # frameformer_small were chosen by training them on Human3.6M (docs/RESULTS.md).
    # Small MixSTE: 27 frames, 3 loops, 64 wide, root-relative input; loop 1 sees 13 of the 27 frames, loop 2 sees
    # 9, and the linear TRM interpolates the 9 back to 27 (0.60x the full GFLOPs).
    "mixste_small": dict(backbone="mixste", frames=27, dim=64, depth=3, heads=4, mlp_ratio=2.0, center_2d=True,
                         schedule=[[1, 13], [2, 9]], trm="linear"),
    # The first small MixSTE (4 loops, 32 wide, screen-position input, cross-attention TRM): the model of the
    # Ray Tune search and of the batch-size throughput figures in docs/RESULTS.md, kept so they stay reproducible.
    "mixste_small_legacy": dict(backbone="mixste", frames=27, dim=32, depth=4, heads=4, mlp_ratio=2.0,
                                schedule=[[1, 9], [3, 5]]),
    "mixste_tiny": dict(backbone="mixste", frames=27, dim=32, depth=2, heads=2, mlp_ratio=2.0,
                        schedule=[[1, 9]]),
    # MotionBERT's DSTformer as in its Human3.6M configs (MB_train_h36m.yaml: dim_feat 256, mlp_ratio 4, depth 5,
    # heads 8, dim_rep 512, 243 frames; input x, y, confidence): 131.1 GFLOPs (linear) full, the papers' figure.
    # Schedule: HoT's stage (81 tokens before block 1), then 41 for the last two blocks.
    "dstformer": dict(backbone="dstformer", frames=243, in_channels=3, dim=256, depth=5, heads=8, mlp_ratio=4.0,
                      rep_dim=512, schedule=[[1, 81], [3, 41]]),
    # Frame tokens (h2ot/models/frameformer.py): 27 frames, 3 blocks, 256 wide, root-relative input; the CPU
    # result's schedule and TRM. Uniform TPM: as accurate as DPC-kNN on GT 2D, steadier on detector-like 2D, and
    # at batch 1 its kept frames are constants (no scoring), where this model's 13 and 9 tokens left DPC-kNN's
    # scoring as much time as the blocks it saves (docs/RESULTS.md R4, R14).
    "frameformer_small": dict(backbone="frameformer", frames=27, dim=256, depth=3, heads=8, mlp_ratio=2.0,
                              center_2d=True, schedule=[[1, 13], [2, 9]], tpm="uniform", trm="linear"),
    "dstformer_small": dict(backbone="dstformer", frames=81, in_channels=3, dim=64, depth=3, heads=4,
                            mlp_ratio=2.0, rep_dim=64, schedule=[[1, 27], [2, 14]]),
}
MODEL_PRESETS: Registry[dict[str, Any]] = Registry("preset", key="model.preset")
for _name, _fields in _PRESETS.items():
    MODEL_PRESETS.register(_name, _fields)


@dataclass
class ModelConfig:
    """What `h2ot.models.build_model` builds. Shapes: input [B, T=frames, J=joints, in_channels]."""

    backbone: str = "mixste"
    preset: str | None = None  # fills every field not given explicitly (see MODEL_PRESETS)
    frames: int = 243
    joints: int = 17
    in_channels: int = 2  # 2: (x, y); 3: (x, y, confidence)
    # Root-relative input: subtract the root joint's (x, y) in every frame, as the 3D targets are root-relative.
    # The papers feed screen positions; small models trained briefly learn far faster from centred keypoints.
    center_2d: bool = False
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 2.0
    rep_dim: int = 0  # DSTformer: width of the pre-logits layer (Linear + tanh) before the head; 0 = none
    dropout: float = 0.0
    drop_path: float = 0.0
    # Hierarchical pruning: [[block, tokens], ...], blocks counted from 0; [] = full model, one stage = HoT.
    schedule: list[list[int]] = field(default_factory=list)
    tpm: str = "dpc_knn"  # token pruning strategy (h2ot.pruning.TPM_REGISTRY)
    tpm_k: int = 2  # neighbours of DPC-kNN
    tpm_seed: int = 0  # seed of the `random` strategy
    trm: str = "cross_attention"  # token recovering strategy (h2ot.recovery.TRM_REGISTRY)
    seq2frame: bool = False  # output only the centre frame

    @property
    def stages(self) -> list[tuple[int, int]]:
        return [(int(b), int(n)) for b, n in self.schedule]


@dataclass
class ModelFileConfig:
    kind: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)


# kind -> config dataclass. h2ot registers `model`; the jobs that run a kind register it where they define it
# (jobs.settings: train, jobs.tune_search: tune, pipelines.config: preprocess), so h2ot knows none of them.
CONFIG_KINDS: Registry[type] = Registry("config kind", key="kind")
CONFIG_KINDS.register("model", ModelFileConfig)


# Only for the error message when a file's kind is read before its module was imported (no import of them here).
_KIND_HOMES = {"train": "jobs.settings", "tune": "jobs.tune_search", "preprocess": "pipelines.config"}


def register_config_kind(kind: str, cls: type) -> None:
    CONFIG_KINDS.register(kind, cls)


# --------------------------------------------------------------------------------------------- building
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Coerce/validate a YAML value against a type hint; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    if cls is ModelConfig and data.get("preset") is not None:
        data = {**MODEL_PRESETS.get(data["preset"]), **data}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {k: _check_value(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], kind: str | None = None) -> Any:
    """Build the typed config for `data` (its `kind` key, or `kind`), validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping, got {type(data).__name__}")
    kind = data.get("kind", kind)
    if kind in _KIND_HOMES and kind not in CONFIG_KINDS:
        raise ConfigError(f"kind: config kind {kind!r} is registered by {_KIND_HOMES[kind]}: import it first "
                          f"(or load the file with its loader, e.g. jobs.settings.load_train_config)")
    return _build(CONFIG_KINDS.get(kind), {**data, "kind": kind})


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.subkey=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Set dotted keys (`optim.epochs=2`) in a nested dict; values are parsed as YAML."""
    data = _deep_copy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`: mappings merge key by key, anything else (lists included) replaces."""
    merged = _deep_copy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _deep_copy(value)
    return merged


def _names_a_base_file(data: dict[str, Any]) -> bool:
    """`base:` is inheritance unless the file's kind has a field of that name (a tune config's `base` is the
    train config it searches around)."""
    if "base" not in data:
        return False
    cls = CONFIG_KINDS[data["kind"]] if data.get("kind") in CONFIG_KINDS else None
    return cls is None or "base" not in {f.name for f in dataclasses.fields(cls)}


def resolve_bases(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML of `path` merged over its `base` file (a path relative to `path`'s folder), recursively."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain[_chain.index(path):], path))
        raise ConfigError(f"base: the config files name each other in a cycle: {cycle}")
    data = load_yaml(path)
    if not _names_a_base_file(data):
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of a config file, got {base!r}")
    if not (path.parent / base).is_file():
        raise ConfigError(f"{path}: base: config file not found: {path.parent / base}")
    return deep_merge(resolve_bases(path.parent / base, (*_chain, path)), data)


def load_config(path: str | Path, overrides: list[str] | None = None, kind: str | None = None) -> Any:
    """YAML file (+ its base files, + `--set` overrides) -> typed config. Errors name the file and the bad key."""
    data = apply_overrides(resolve_bases(path), overrides)
    if kind is not None and data.get("kind", kind) != kind:
        raise ConfigError(f"{path}: kind is {data.get('kind')!r}, expected {kind!r}")
    try:
        cfg = config_from_dict(data, kind)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if hasattr(cfg, "resolve_paths"):  # a kind whose paths are relative to the file (a tune config's base)
        cfg.resolve_paths(Path(path).parent)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (what is handed to Ray and stored in checkpoints)."""
    return dataclasses.asdict(cfg)
