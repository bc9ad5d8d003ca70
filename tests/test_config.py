"""Typed configs: YAML loading, dotted overrides, clear errors; every shipped config loads and builds."""

from __future__ import annotations

from pathlib import Path

import pytest

import jobs.tune_search  # noqa: F401  (registers the "tune" kind)
import pipelines.config  # noqa: F401  (registers the "preprocess" kind)
from h2ot.config import ConfigError, apply_overrides, config_from_dict, deep_merge, load_config
from h2ot.models import build_model
from h2ot.registry import Registry
from jobs.settings import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_train_config_with_preset_and_overrides(tmp_path) -> None:
    path = write(tmp_path, "kind: train\nmodel:\n  preset: mixste_tiny\noptim:\n  epochs: 3\n")
    cfg = load_config(path, ["optim.epochs=5", "model.schedule=[[1, 5]]", "optim.lr=1e-3"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.epochs == 5 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.frames == 27 and cfg.model.schedule == [[1, 5]]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("kind: train\noptim:\n  epocs: 3\n", [], "unknown config key optim.epocs"),
        ("kind: train\n", ["optim.batch_size=abc"], "optim.batch_size: expected an integer"),
        ("kind: train\n", ["model.preset=nope"], "model.preset: unknown preset"),
        ("kind: bogus\n", [], "kind: unknown config kind"),
        ("kind: train\n", ["optim"], "must look like key.subkey=value"),
        ("kind: train\nmodel: 3\n", [], "model: expected a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


def test_missing_or_invalid_yaml_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "kind: [train\n"))


def test_overrides_do_not_mutate_the_input() -> None:
    data = {"kind": "train", "optim": {"epochs": 1}}
    out = apply_overrides(data, ["optim.epochs=2", "run.name=x"])
    assert data["optim"]["epochs"] == 1 and out["optim"]["epochs"] == 2 and out["run"]["name"] == "x"
    assert config_from_dict(out).run.name == "x"


def test_configs_are_shipped() -> None:
    assert SHIPPED, "configs/*.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_builds(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.kind in path.read_text()
    model_cfg = getattr(cfg, "model", None)
    if model_cfg is None:  # e.g. a tune config: it names the train config it searches over
        model_cfg = getattr(cfg, "model_config", lambda: None)()
    if model_cfg is not None:
        build_model(model_cfg)


def test_startup_failures_default_to_waiting_for_capacity() -> None:
    """run.max_startup_failures -> Ray Train's controller_failure_limit: -1 (Ray's default) waits for capacity."""
    assert TrainConfig().run.max_startup_failures == -1
    assert config_from_dict(apply_overrides({"kind": "train"}, ["run.max_startup_failures=1"])).run \
        .max_startup_failures == 1


# --------------------------------------------------------------------------------------------- base files
def test_a_config_changes_a_few_keys_of_its_base_chain(tmp_path) -> None:
    (tmp_path / "budget.yaml").write_text("kind: train\noptim:\n  epochs: 3\n  lr: 0.002\nrun:\n  experiment: e\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "h2ot.yaml").write_text("base: ../budget.yaml\nmodel:\n  preset: mixste_tiny\n")
    (tmp_path / "sub" / "full.yaml").write_text("base: h2ot.yaml\nmodel:\n  schedule: []\noptim:\n  epochs: 5\n")
    cfg = load_config(tmp_path / "sub" / "full.yaml", ["optim.seed=1"])
    assert cfg.model.schedule == [] and cfg.model.dim == 32  # the preset, less its schedule
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.seed, cfg.run.experiment) == (5, 0.002, 1, "e")
    assert load_config(tmp_path / "sub" / "h2ot.yaml").model.schedule == [[1, 9]]


def test_base_cycles_and_missing_bases_name_the_files(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("kind: train\nbase: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("kind: train\nbase: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: base: config file not found: .*nope\.yaml"):
        load_config(tmp_path / "c.yaml")


def test_deep_merge_replaces_lists_and_keeps_the_inputs() -> None:
    base = {"model": {"schedule": [[1, 9]], "dim": 32}, "optim": {"epochs": 1}}
    merged = deep_merge(base, {"model": {"schedule": []}})
    assert merged == {"model": {"schedule": [], "dim": 32}, "optim": {"epochs": 1}}
    assert base["model"]["schedule"] == [[1, 9]]


def test_a_tune_configs_base_is_the_train_config_it_searches() -> None:
    cfg = load_config(CONFIG_DIR / "tune_tiny.yaml")
    assert Path(cfg.base).name == "tiny.yaml" and cfg.space.include


# --------------------------------------------------------------------------------------------- registry
def test_registry_names_the_key_and_the_known_names() -> None:
    reg: Registry[int] = Registry("widget", key="model.widget")
    reg.register("b", 2)

    @reg.register("a")
    def make_a() -> int:
        return 1

    assert reg.get("a") is make_a and reg["b"] == 2 and "a" in reg and list(reg) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^model\.widget: unknown widget 'c'; known: a, b$"):
        reg.get("c")
    with pytest.raises(ConfigError, match="model.backbone: unknown backbone 'nope'; known: dstformer, "):
        build_model({"backbone": "nope"})
    with pytest.raises(ConfigError, match=r"^space\.widgets\[1\]: unknown widget 'c'; known: a, b$"):
        reg.get("c", key="space.widgets[1]")  # an entry of a list of names, checked against the same registry


@pytest.mark.parametrize("check, message", [
    (lambda: build_model({"backbone": "mixste", "schedule": [[1, 9]], "tpm": "nope"}),
     "model.tpm: unknown pruning strategy 'nope'; known: attention, dpc_knn, "),
    (lambda: build_model({"backbone": "mixste", "schedule": [[1, 9]], "trm": "nope"}),
     "model.trm: unknown recovering strategy 'nope'; known: cross_attention, linear, "),
    (lambda: pipelines.config.PreprocessConfig(source="nope"),
     "source: unknown source 'nope'; known: 3dhp, bvh, cmu, h36m, synthetic"),
])
def test_every_named_choice_answers_with_the_key_and_the_known_names(check, message) -> None:
    with pytest.raises(ConfigError) as e:
        check()
    assert str(e.value).startswith(message), str(e.value)


# --------------------------------------------------------------------------------------------- boundary
def test_h2ot_knows_only_the_model_kind_and_names_the_module_of_the_others(tmp_path) -> None:
    """A train file read before jobs.settings registered its kind is one line naming where the kind lives."""
    import subprocess
    import sys

    code = ("from h2ot.config import ConfigError, load_config\n"
            f"try:\n    load_config({str(CONFIG_DIR / 'tiny.yaml')!r})\n"
            "except ConfigError as e:\n    print(e)\n"
            "import jobs.settings\n"
            f"print(type(load_config({str(CONFIG_DIR / 'tiny.yaml')!r})).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    assert "kind: config kind 'train' is registered by jobs.settings" in out[0]
    assert out[1] == "TrainConfig"
