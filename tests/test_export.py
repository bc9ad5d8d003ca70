"""ONNX export: the whole model (pruning inside) as one graph that ONNX Runtime runs with the same poses and the same
kept frames as PyTorch, for every registered backbone x exportable TPM x TRM (fast suite: one config per backbone;
the full matrix under -m slow); the strategy that cannot export says so by name; `h2ot export` verifies itself."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from h2ot.checkpoint import save_checkpoint  # noqa: E402
from h2ot.config import config_from_dict  # noqa: E402
from h2ot.export import ExportError, OnnxPoseModel, check_exportable, compare, export_onnx, read_metadata  # noqa: E402
from h2ot.models import MODEL_REGISTRY, build_model, predict  # noqa: E402
from h2ot.pruning import TPM_REGISTRY, top_n_in_time_order  # noqa: E402
from h2ot.recovery import TRM_REGISTRY  # noqa: E402
from jobs.export import main as export_main  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import write_tiny_shards  # noqa: E402

TOLERANCE_M = 1e-4
# One small pruned config per registered backbone (the fast suite); the slow matrix varies TPM and TRM on them.
SMALL = {
    "mixste": dict(backbone="mixste", frames=27, dim=32, depth=3, heads=4, schedule=[[1, 13], [2, 5]]),
    "dstformer": dict(backbone="dstformer", frames=27, in_channels=3, dim=32, depth=3, heads=4, rep_dim=16,
                      schedule=[[1, 13], [2, 5]], tpm="attention", trm="linear"),
    "frameformer": dict(backbone="frameformer", frames=27, dim=32, depth=3, heads=4, schedule=[[1, 13], [2, 5]],
                        tpm="uniform", trm="nearest"),
    "mlp": dict(backbone="mlp", frames=27, dim=32, depth=2),
}


def _cfg(**fields):
    return config_from_dict({"kind": "model", "model": fields}).model


def _windows(cfg, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, cfg.frames, cfg.joints, cfg.in_channels, generator=torch.Generator().manual_seed(seed)) * 0.3


def _round_trip(tmp_path: Path, cfg) -> None:
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = export_onnx(model, cfg, tmp_path / "model.onnx")
    exported = OnnxPoseModel(path)
    for batch in (1, 5):  # the batch axis is dynamic: neither is the example batch the graph was traced with
        agreement = compare(model, exported, _windows(cfg, batch), batch_size=batch)
        assert agreement.kept_equal, f"{cfg.backbone}/{cfg.tpm}/{cfg.trm}: other kept frames at batch {batch}"
        assert agreement.max_abs_diff_m <= TOLERANCE_M, (cfg.backbone, cfg.tpm, cfg.trm, agreement)
    out = exported(_windows(cfg, 2))
    assert out.pose_3d.shape[0] == 2 and len(out.kept_indices) == len(cfg.stages)
    for kept, (_, n) in zip(out.kept_indices, cfg.stages):
        assert kept.shape == (2, n) and torch.all(kept[:, 1:] > kept[:, :-1])


def test_small_configs_cover_every_registered_backbone() -> None:
    assert set(SMALL) == set(MODEL_REGISTRY), "add a small export config for the new backbone"


@pytest.mark.parametrize("backbone", sorted(SMALL))
def test_export_round_trip_one_per_backbone(tmp_path: Path, backbone: str) -> None:
    _round_trip(tmp_path, _cfg(**SMALL[backbone]))


# Every exportable combination. DPC-kNN on the frame-token model once kept other frames in ONNX Runtime than in
# PyTorch (2 of 5 windows): mutual nearest neighbours had densities equal up to rounding, and the two runtimes
# rounded them the other way; h2ot.pruning.pairwise_sq_distances now makes such ties exact.
EXPORTABLE = [
    (backbone, tpm, trm)
    for backbone, tpm, trm in itertools.product(sorted(SMALL), sorted(TPM_REGISTRY), sorted(TRM_REGISTRY))
    if backbone != "mlp" and TPM_REGISTRY[tpm].exportable and TRM_REGISTRY[trm].exportable
]


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "tpm", "trm"), EXPORTABLE)
def test_export_round_trip_full_matrix(tmp_path: Path, backbone: str, tpm: str, trm: str) -> None:
    _round_trip(tmp_path, _cfg(**{**SMALL[backbone], "tpm": tpm, "trm": trm}))


@pytest.mark.slow
@pytest.mark.parametrize("tpm", [name for name, cls in sorted(TPM_REGISTRY.items()) if cls.exportable])
def test_export_round_trip_seq2frame(tmp_path: Path, tpm: str) -> None:
    _round_trip(tmp_path, _cfg(**{**SMALL["mixste"], "seq2frame": True, "tpm": tpm}))


def test_random_tpm_refuses_export_by_name(tmp_path: Path) -> None:
    cfg = _cfg(**{**SMALL["mixste"], "tpm": "random"})
    with pytest.raises(ExportError, match="'random' cannot be exported"):
        check_exportable(cfg)
    with pytest.raises(ExportError, match="random"):
        export_onnx(build_model(cfg), cfg, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()
    check_exportable(_cfg(**{**SMALL["mixste"], "tpm": "random", "schedule": []}))  # a full model prunes nothing


def test_export_cli_refuses_random_in_one_line(tmp_path: Path, capsys) -> None:
    cfg = _cfg(**{**SMALL["mixste"], "tpm": "random"})
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model(cfg), cfg)
    assert export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "random" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_export_cli_verifies_on_shards_and_writes_metadata(tmp_path: Path, capsys) -> None:
    cfg = _cfg(preset="mixste_tiny")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model(cfg), cfg)
    shards = write_tiny_shards(tmp_path / "shards", frames=cfg.frames, n_train=8, n_test=12)
    out = tmp_path / "model.onnx"
    code = export_main(["--checkpoint", str(ckpt), "--out", str(out), "--data", str(shards), "--windows", "12",
                        "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and report["same_kept_frames"] and report["source"] == "test split"
    assert report["max_abs_diff_m"] <= TOLERANCE_M
    assert report["mpjpe_mm_onnx"] == pytest.approx(report["mpjpe_mm_pytorch"], abs=0.01)
    meta = read_metadata(out)
    assert meta["frames"] == "27" and meta["joints"] == "17" and meta["input_channels"] == "2"
    assert json.loads(meta["schedule"]) == cfg.schedule and meta["tpm"] == "dpc_knn"
    assert meta["trm"] == "cross_attention" and "frames, joints" in meta["input_layout"]
    import hashlib

    assert meta["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert meta["code_revision"]
    # and the file runs where a torch model runs: test-time flip through predict
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    x = _windows(cfg, 3)
    with torch.no_grad():
        ref = predict(model, x)
    got = predict(OnnxPoseModel(out), x)
    np.testing.assert_allclose(got.pose_3d.numpy(), ref.pose_3d.numpy(), atol=TOLERANCE_M)


def test_export_cli_rejects_bad_output_name(tmp_path: Path, capsys) -> None:
    assert export_main(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "model.bin")]) == 2
    assert ".onnx" in capsys.readouterr().err


def test_bench_runs_every_runtime_and_precision_side_by_side(tmp_path: Path, capsys) -> None:
    from jobs.bench import main as bench_main

    shards = write_tiny_shards(tmp_path / "shards", frames=27, n_train=8, n_test=8)
    config = tmp_path / "tiny.yaml"
    config.write_text("kind: model\nmodel:\n  preset: mixste_tiny\n")
    argv = ["--config", str(config), "--runtime", "eager,onnx", "--precision", "fp32,bf16,int8", "--repeats", "1",
            "--warmup", "0", "--data", str(shards), "--windows", "8", "--json"]
    assert bench_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("full_clips_per_s", "h2ot_onnx_fp32_clips_per_s", "h2ot_eager_bf16_clips_per_s",
                "h2ot_onnx_int8_clips_per_s", "throughput_ratio_onnx_fp32", "h2ot_onnx_int8_vs_eager_fp32"):
        assert out[key] > 0, key
    assert sorted(out["skipped"]) == ["eager/int8", "onnx/bf16"]
    mpjpe = out["mpjpe_mm"]
    assert mpjpe["h2ot_onnx_fp32"] == pytest.approx(mpjpe["h2ot"], abs=0.01)  # same model, other runtime
    assert set(mpjpe) == {"full", "h2ot"} | {f"{v}_{r}" for v in ("full", "h2ot")
                                             for r in ("eager_bf16", "onnx_fp32", "onnx_int8")}
    assert bench_main(["--runtime", "tpu"]) == 2
    assert "--runtime" in capsys.readouterr().err


def _node_domains(path: Path) -> list[tuple[str, str]]:
    import onnx

    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("schedule", [[], [[1, 13], [2, 5]]])
def test_fused_attention_graph_is_leaner_and_agrees_with_plain(tmp_path: Path, schedule) -> None:
    """Every self-attention of a MixSTE exports as one com.microsoft Attention node (no Softmax left in a full model);
    the fused and the standard-ops graphs both agree with PyTorch and keep the same frames."""
    cfg = _cfg(**{**SMALL["mixste"], "schedule": schedule})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fused = export_onnx(model, cfg, tmp_path / "fused.onnx")
    plain = export_onnx(model, cfg, tmp_path / "plain.onnx", fuse_attention=False)
    fused_nodes, plain_nodes = _node_domains(fused), _node_domains(plain)
    assert fused_nodes.count(("com.microsoft", "Attention")) == 2 * cfg.depth
    assert not any(domain for domain, _ in plain_nodes)  # standard ONNX only
    assert len(plain_nodes) - len(fused_nodes) >= 10 * 2 * cfg.depth  # about 20 nodes become 1 per attention
    if not schedule:
        assert ("", "Softmax") not in fused_nodes
    assert read_metadata(fused)["fused_attention"].startswith(f"{2 * cfg.depth} com.microsoft Attention")
    assert "fused_attention" not in read_metadata(plain)
    x = _windows(cfg, 5, seed=3)
    for path in (fused, plain):
        agreement = compare(model, OnnxPoseModel(path), x, batch_size=5)
        assert agreement.kept_equal and agreement.max_abs_diff_m <= TOLERANCE_M, (path.name, agreement)


def test_fused_attention_op_computes_what_the_layer_computes() -> None:
    """The export-time op h2ot::self_attention is the layer's own attention (eager, same inputs), and leaving the
    context restores the layer; a layer that records attention for a TPM keeps its explicit path."""
    from h2ot.export import fused_attention
    from h2ot.layers import ATTENTION_RECEIVED, Attention

    torch.manual_seed(0)
    layer = Attention(32, 4).eval()
    x = torch.randn(6, 11, 32)
    with torch.no_grad():
        ref = layer(x)
        with fused_attention(layer):
            assert "forward" in vars(layer)
            got = layer(x)
            sink: dict = {}
            recorded = layer(x, sink)
        assert "forward" not in vars(layer)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(recorded, ref, atol=1e-6, rtol=0)
    assert sink[ATTENTION_RECEIVED].shape == (6, 11)


def test_export_cli_standard_ops_writes_no_contrib_node(tmp_path: Path, capsys, caplog) -> None:
    cfg = _cfg(preset="mixste_tiny")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "model.pt", build_model(cfg), cfg)
    out = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(ckpt), "--out", str(out), "--windows", "4", "--standard-ops",
                        "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert not any(domain for domain, _ in _node_domains(out)) and "fused_attention" not in read_metadata(out)
    with caplog.at_level("INFO", logger="h2ot.export"):
        OnnxPoseModel(out)
    assert "standard ONNX operators" in caplog.text


class _TopN(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return top_n_in_time_order(scores, self.n)


@pytest.mark.parametrize("n", [1, 9, 27])
def test_exported_top_n_breaks_ties_like_a_stable_sort(tmp_path: Path, n: int) -> None:
    """The exported selection is ONNX's TopK, whose ties go to the lower index: on scores with many ties (and an
    inf, as a kept centre frame has) ONNX Runtime keeps the positions PyTorch's stable sort keeps."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(n)
    tied = torch.randint(0, 4, (16, 27), generator=g).float()
    tied[::3, 13] = torch.inf
    path = tmp_path / "top_n.onnx"
    with torch.no_grad():
        torch.onnx.export(_TopN(n), (tied,), dynamo=True, verbose=False, input_names=["scores"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"scores": tied.numpy()})[0]
    np.testing.assert_array_equal(exported, top_n_in_time_order(tied, n).numpy())
