"""Issue 7: DSTformer, seq2frame, the motion / attention / random TPMs, the nearest TRM, 3DHP metrics, FLOPs."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from h2ot.config import ModelConfig, config_from_dict
from h2ot.flops import model_gflops, predicted_linear_flops
from h2ot.layers import ATTENTION_RECEIVED, Attention
from h2ot.metrics import AUC_THRESHOLDS_MM, PCKAccumulator, auc_3dhp, pck_3dhp, per_action_mean
from h2ot.models import MODEL_REGISTRY, PoseOutput, build_model, predict
from h2ot.pruning import TPM_REGISTRY
from h2ot.recovery import TRM_REGISTRY
from h2ot.schedule import validate_schedule
from h2ot.targets import select_targets

PRUNABLE = sorted(name for name in MODEL_REGISTRY if name != "mlp")  # the per-frame MLP has no frame tokens


def cfg_of(backbone: str, **kw) -> ModelConfig:
    base = dict(backbone=backbone, frames=27, dim=16, depth=3, heads=2, mlp_ratio=2.0, schedule=[[1, 13], [2, 5]])
    if backbone == "dstformer":
        base.update(in_channels=3, rep_dim=24)
    base.update(kw)
    return ModelConfig(**base)


def preset(name: str, **kw) -> ModelConfig:
    return config_from_dict({"kind": "model", "model": {"preset": name, **kw}}).model


# --------------------------------------------------------------------------------------------- seq2frame
@pytest.mark.parametrize("backbone", PRUNABLE)
@pytest.mark.parametrize("tpm", sorted(TPM_REGISTRY))
def test_seq2frame_keeps_the_centre_with_every_tpm(backbone: str, tpm: str) -> None:
    cfg = cfg_of(backbone, seq2frame=True, tpm=tpm, schedule=[[1, 4], [2, 2]])  # uniform's 4 picks skip frame 13
    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randn(2, cfg.frames, cfg.joints, cfg.in_channels)
    centre = cfg.frames // 2

    out = model(x)  # training mode: the kept frames, the targets of the loss
    assert out.pose_3d.shape == (2, 2, cfg.joints, 3)
    assert torch.equal(out.frame_indices, out.kept_indices[-1])
    out.pose_3d.square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(x)  # eval mode: the centre frame only
    assert out.pose_3d.shape == (2, 1, cfg.joints, 3)
    assert out.frame_indices.tolist() == [[centre], [centre]]
    for kept in out.kept_indices:
        assert all(centre in row for row in kept.tolist()), f"{tpm} dropped the centre frame"
    assert model.hourglass.recovery is None, "seq2frame has no TRM"


def test_seq2frame_rejects_a_window_without_a_centre_frame() -> None:
    with pytest.raises(ValueError, match="model.frames"):
        validate_schedule([[1, 5]], depth=3, frames=26, seq2frame=True)
    with pytest.raises(ValueError, match=r"model.schedule\[0\]"):
        build_model(cfg_of("mixste", seq2frame=True, schedule=[[1, 0]]))
    validate_schedule([[1, 1]], depth=3, frames=27, seq2frame=True)  # one token: the centre itself


def test_select_targets_follows_frame_indices() -> None:
    pose = torch.arange(2 * 7 * 1 * 3, dtype=torch.float32).reshape(2, 7, 1, 3)
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1] * 7]).bool()
    kept = torch.tensor([[0, 3, 5], [1, 3, 6]])
    target, v = select_targets(PoseOutput(torch.zeros(2, 3, 1, 3), [kept], kept), pose, valid)
    assert torch.equal(target, torch.stack([pose[0, [0, 3, 5]], pose[1, [1, 3, 6]]]))
    assert v.tolist() == [[True, True, False], [True, True, True]]
    centre = torch.full((2, 1), 3)
    target, v = select_targets(PoseOutput(torch.zeros(2, 1, 1, 3), [], centre), pose)
    assert torch.equal(target, pose[:, 3:4]) and v.all()


# --------------------------------------------------------------------------------------------- TPMs
def test_attention_pruner_picks_the_frames_a_constructed_attention_map_favours() -> None:
    # One head whose queries are a constant vector along channel 0 and whose keys are the tokens themselves:
    # every query attends most to the frames with a large channel 0, so those frames receive the most attention.
    b, t, j, c = 2, 12, 3, 4
    favoured = [[1, 5, 8, 10], [0, 2, 7, 11]]
    x = torch.zeros(b, t, j, c)
    for i, frames in enumerate(favoured):
        x[i, frames, :, 0] = 1.0
    attn = Attention(c, heads=1)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        attn.qkv.bias[0] = 20.0  # q = 20 e_0
        attn.qkv.weight[c : 2 * c] = torch.eye(c)  # k = token
        attn.qkv.weight[2 * c :] = torch.eye(c)  # v = token
    sink: dict = {}
    tokens = x.permute(0, 2, 1, 3).reshape(b * j, t, c)  # temporal sequences, one per joint
    out = attn(tokens, sink)
    torch.testing.assert_close(out, attn(tokens), rtol=1e-5, atol=1e-6)  # same output as the SDPA path
    assert sink[ATTENTION_RECEIVED].shape == (b * j, t)
    torch.testing.assert_close(sink[ATTENTION_RECEIVED].sum(dim=1), torch.full((b * j,), float(t)))
    pruner = TPM_REGISTRY["attention"](ModelConfig(frames=t))
    _, kept = pruner(x, 4, torch.arange(t).expand(b, t), context=sink)
    assert kept.tolist() == favoured


def test_attention_tpm_is_fed_by_the_block_before_the_stage() -> None:
    for backbone in PRUNABLE:
        model = build_model(cfg_of(backbone, tpm="attention")).eval()
        state = model.hourglass.start(torch.zeros(1, 27, 17, 16))
        sinks = [model.hourglass.attention_sink(i, state) is not None for i in range(3)]
        assert sinks == [True, True, False], backbone  # stages before blocks 1 and 2
        model_dpc = build_model(cfg_of(backbone)).eval()
        assert model_dpc.hourglass.attention_sink(0, state) is None, "no recording for other strategies"


def test_motion_pruner_keeps_the_frames_that_move() -> None:
    t = 10
    feat = torch.zeros(1, t, 2, 3)
    feat[0, 4:, :, 0] = 1.0  # a jump into frame 4
    feat[0, 7:, :, 1] = 3.0  # a bigger jump into frame 7
    _, kept = TPM_REGISTRY["motion"](ModelConfig(frames=t))(feat, 2, torch.arange(t)[None])
    assert kept.tolist() == [[4, 7]]


def test_random_pruner_is_seeded_and_deterministic_in_eval() -> None:
    x = torch.randn(2, 30, 17, 4)
    idx = torch.arange(30).expand(2, 30)
    a = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).eval()
    b = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).eval()
    other = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=2)).eval()
    kept_a, kept_b, kept_other = a(x, 8, idx)[1], b(x, 8, idx)[1], other(x, 8, idx)[1]
    assert torch.equal(kept_a, a(x, 8, idx)[1]) and torch.equal(kept_a, kept_b)
    assert not torch.equal(kept_a, kept_other)
    train = TPM_REGISTRY["random"](ModelConfig(frames=30, tpm_seed=1)).train()
    draws = {tuple(train(x, 8, idx)[1].flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1, "training draws a fresh selection each step"


# --------------------------------------------------------------------------------------------- TRM
def test_nearest_trm_reproduces_a_piecewise_constant_sequence() -> None:
    bounds, kept = [(0, 5), (5, 11), (11, 18)], [2, 7, 14]  # midpoints 4.5 and 10.5 fall on the boundaries
    j, c = 3, 4
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(1, 1, j, c, generator=g) for _ in bounds]
    full = torch.cat([v.expand(1, hi - lo, j, c) for v, (lo, hi) in zip(values, bounds)], dim=1)
    trm = TRM_REGISTRY["nearest"](ModelConfig(frames=18), c)
    out = trm(full[:, kept], torch.tensor([kept]), 18)
    assert torch.equal(out, full)
    # ties go to the earlier kept frame; beyond the ends the first / last kept frame is held
    x_kept = torch.tensor([[1.0, 2.0]]).reshape(1, 2, 1, 1)
    out = trm(x_kept, torch.tensor([[2, 6]]), 9).flatten().tolist()
    assert out == [1, 1, 1, 1, 1, 2, 2, 2, 2]


# --------------------------------------------------------------------------------------------- DSTformer
@pytest.mark.parametrize("tpm", sorted(TPM_REGISTRY))
@pytest.mark.parametrize("trm", sorted(TRM_REGISTRY))
def test_dstformer_forward_backward_every_strategy(tpm: str, trm: str) -> None:
    cfg = cfg_of("dstformer", depth=2, schedule=[[1, 9]], tpm=tpm, trm=trm)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(torch.randn(2, 27, 17, 3))
    assert isinstance(out, PoseOutput) and out.pose_3d.shape == (2, 27, 17, 3)
    assert out.kept_indices[0].shape == (2, 9)
    out.pose_3d.square().mean().backward()
    assert model.embed.weight.grad.abs().sum() > 0


def test_dstformer_fuses_the_two_streams_equally_at_init() -> None:
    model = build_model(cfg_of("dstformer", schedule=[]))
    for block in model.blocks:
        assert torch.all(block.fuse.weight == 0) and torch.all(block.fuse.bias == 0.5)
    assert model.embed.in_features == 3, "x, y, confidence"


def test_paper_size_dstformer_prediction_matches_motionbert_figures() -> None:
    # HoT paper: MotionBERT 131.1 GFLOPs, HoT + MotionBERT 63.2 (Linear layers, 243 frames). The measured count
    # equals the prediction (checked on small sizes below; paper size is slow on CPU: see `h2ot bench`).
    full = predicted_linear_flops(preset("dstformer", schedule=[])) / 1e9
    hot = predicted_linear_flops(preset("dstformer", schedule=[[1, 81]])) / 1e9
    h2ot = predicted_linear_flops(preset("dstformer")) / 1e9
    assert full == pytest.approx(131.1, abs=0.1)
    assert hot == pytest.approx(63.2, abs=0.1)
    assert h2ot < hot


@functools.cache
def small_full_dstformer_gflops() -> dict[str, float]:
    cfg = cfg_of("dstformer", frames=45, schedule=[])
    return model_gflops(build_model(cfg), cfg)


@pytest.mark.parametrize(
    "schedule, tpm, seq2frame",
    [
        ([[1, 15]], "dpc_knn", False),
        ([[1, 15], [2, 5]], "attention", False),  # column sums of both streams' recorded attention
        ([[0, 15], [2, 5]], "attention", False),  # block 0: the parameter-free fallback (a counted matmul)
        ([[1, 15], [2, 5]], "motion", True),  # seq2frame in eval: head and pre-logits on the centre frame
    ],
)
def test_dstformer_flops_match_the_prediction(schedule, tpm, seq2frame) -> None:
    cfg = cfg_of("dstformer", frames=45, schedule=schedule, tpm=tpm, seq2frame=seq2frame)
    g, full = model_gflops(build_model(cfg), cfg), small_full_dstformer_gflops()
    assert g["gflops_linear"] == pytest.approx(g["gflops_predicted_linear"], rel=0.05)
    assert g["gflops_total"] == pytest.approx(g["gflops_predicted_total"], rel=0.05)
    assert full["gflops_linear"] == pytest.approx(full["gflops_predicted_linear"], rel=1e-6)
    assert full["gflops_total"] == pytest.approx(full["gflops_predicted_total"], rel=1e-6)
    assert g["gflops_total"] < full["gflops_total"]


# --------------------------------------------------------------------------------------------- 3DHP metrics
def test_pck_and_auc_against_hand_computed_values() -> None:
    errors_mm = torch.tensor([0.0, 3.0, 7.0, 100.0, 149.9, 150.0, 200.0])
    pred = torch.zeros(1, 1, 7, 3)
    target = torch.zeros(1, 1, 7, 3)
    target[0, 0, :, 0] = errors_mm / 1000.0  # metres
    # PCK@150: 0, 3, 7, 100 and 149.9 are strictly below 150 -> 5 of 7
    assert float(pck_3dhp(pred, target)) == pytest.approx(500 / 7)
    # AUC: mean over t = 0, 5, ..., 150 of #(e < t) / 7. t = 0: 0; t = 5: 2; t = 10..100: 3 (19 values);
    # t = 105..145: 4 (9 values); t = 150: 5  ->  (0 + 2 + 19*3 + 9*4 + 5) / 31 / 7
    assert len(AUC_THRESHOLDS_MM) == 31
    assert float(auc_3dhp(pred, target)) == pytest.approx((2 + 57 + 36 + 5) / 31 / 7 * 100)
    assert float(pck_3dhp(pred, target, joints=[0, 6])) == pytest.approx(50.0)


def test_pck_honours_the_mask_and_aggregates_per_action() -> None:
    pred = torch.zeros(2, 2, 1, 3)
    target = torch.zeros(2, 2, 1, 3)
    target[0, 1, 0, 0] = 0.2  # 200 mm, in a padded frame
    target[1, :, 0, 0] = 0.2  # 200 mm in both frames of clip 1
    valid = torch.tensor([[True, False], [True, True]])
    assert float(pck_3dhp(pred, target, valid)) == pytest.approx(100 / 3)
    acc = PCKAccumulator()
    acc.update(pred, target, valid, ["TS1", "TS2"])
    res = acc.result()
    assert res["pck"] == pytest.approx(100 / 3) and res["joints"] == 3
    assert res["per_action"]["TS1"]["pck"] == 100.0 and res["per_action"]["TS2"]["pck"] == 0.0
    assert res["per_action"]["TS1"]["auc"] == pytest.approx(30 / 31 * 100)  # every threshold but 0
    assert per_action_mean([1.0, 3.0, 5.0], ["a", "b", "a"], [1.0, 1.0, 3.0]) == {"a": 4.0, "b": 3.0}


def test_bench_compares_hot_at_block_1_for_dstformer() -> None:
    from jobs.bench import _variants

    variants = _variants("dstformer")
    assert variants["hot"].schedule == [[1, 81]] and variants["h2ot"].schedule == [[1, 81], [3, 41]]
    assert _variants("mixste")["hot"].schedule == [[3, 81]]


def test_bench_counts_clips_per_second_per_batch(capsys) -> None:
    from jobs.bench import main

    assert main(["--preset", "frameformer_small", "--batch", "4", "--repeats", "2", "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batch"] == 4 and out["h2ot_schedule"] == [[1, 13], [2, 9]]
    assert out["full_clips_per_s"] > 0 and out["flops_ratio_linear"] < 1
    with pytest.raises(SystemExit):
        main(["--batch", "0"])


def test_predict_with_flip_on_a_seq2frame_model_in_eval_gives_the_centre() -> None:
    model = build_model(cfg_of("dstformer", seq2frame=True)).eval()
    with torch.no_grad():
        out = predict(model, torch.randn(1, 27, 17, 3))
    assert out.pose_3d.shape == (1, 1, 17, 3) and out.frame_indices.tolist() == [[13]]


# --------------------------------------------------------------------------------------------- frame tokens
def test_frameformer_mixes_frames_and_prunes_frame_tokens() -> None:
    """One token a frame: an input change in frame 0 reaches every output frame (the per-frame MLP's stays in
    frame 0), the TPMs keep [B, n] frame indices, and the FLOPs predictions count frame tokens, not joints."""
    torch.manual_seed(0)
    x = torch.randn(1, 27, 17, 2)
    moved = x.clone()
    moved[0, 0] += 0.5
    for backbone, reaches_others in (("frameformer", True), ("mlp", False)):
        model = build_model(cfg_of(backbone, dim=32, heads=4, schedule=[])).eval()
        with torch.no_grad():
            change = (model(moved).pose_3d - model(x).pose_3d).abs().amax(dim=(0, 2, 3))
        assert change[0] > 0
        assert bool((change[1:] > 1e-6).all()) is reaches_others, backbone
    cfg = preset("frameformer_small")  # [[1, 13], [2, 9]], linear TRM (no parameters, no Linear FLOPs)
    out = build_model(cfg)(torch.randn(2, 27, 17, 2))
    assert out.pose_3d.shape == (2, 27, 17, 3) and [k.shape for k in out.kept_indices] == [(2, 13), (2, 9)]
    block = 4 * 256 * 256 + 2 * 256 * 512
    by_hand = 27 * 34 * 256 + (27 + 13 + 9) * block + 27 * 256 * 51
    assert predicted_linear_flops(cfg) == 2 * by_hand
    cross = preset("frameformer_small", trm="cross_attention")  # + T queries, n keys and values, T outputs: C^2
    assert predicted_linear_flops(cross) == 2 * (by_hand + (27 + 2 * 9 + 27) * 256 * 256)
