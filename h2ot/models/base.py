"""What every model returns, the model registry, and test-time flip averaging."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.registry import Registry
from h2ot.skeleton import flip_pose


@dataclass
class PoseOutput:
    """The one output type of every model.

    pose_3d: [B, T_out, J, 3] root-relative camera-frame joints (metres). T_out = T (seq2seq) or 1 (seq2frame).
    kept_indices: per pruning stage, [B, n_s] ORIGINAL frame indices kept (sorted); [] for a full model.
    frame_indices: [B, T_out] original frame index of each output frame (arange(T), or the centre); always set
        (a model that gives none outputs every frame: arange(T_out)).
    """

    pose_3d: torch.Tensor
    kept_indices: list[torch.Tensor] = field(default_factory=list)
    frame_indices: torch.Tensor = None  # type: ignore[assignment]  # filled in by __post_init__ when omitted

    def __post_init__(self) -> None:
        if self.frame_indices is None:
            b, t = self.pose_3d.shape[:2]
            self.frame_indices = torch.arange(t, device=self.pose_3d.device).expand(b, t)


@dataclass(frozen=True)
class CostTerms:
    """A backbone's analytic cost, from which h2ot.flops predicts FLOPs for any schedule (MACs per joint token).

    block_linear_macs: Linear MACs of one block per joint token it sees (the schedule sets the tokens per block).
    spatial_attentions / temporal_attentions: attention layers per block over the J joints of a frame / over the
        T' frames of a joint (their products QK^T and AV are not Linear layers: the total convention counts them).
    input_linear_macs: Linear MACs per joint token of all T input frames before the first block (embedding).
    output_linear_macs: Linear MACs per joint token of each output frame (head, pre-logits), after the TRM.
    tokens_per_frame: tokens a frame is split into; None: one per joint (J). A frame-token backbone says 1, and
        its terms are then per frame token.
    """

    block_linear_macs: float
    spatial_attentions: int
    temporal_attentions: int
    input_linear_macs: float
    output_linear_macs: float
    tokens_per_frame: int | None = None


def block_linear_macs(cfg: ModelConfig) -> int:
    """Linear MACs per token of one pre-norm transformer block (h2ot.layers.Block): 4 C^2 (qkv, proj) + 2 C hidden
    (MLP)."""
    return 4 * cfg.dim * cfg.dim + 2 * cfg.dim * int(cfg.dim * cfg.mlp_ratio)


def drop_path_rates(cfg: ModelConfig) -> list[float]:
    """Stochastic depth rising linearly to cfg.drop_path over the cfg.depth blocks."""
    return torch.linspace(0, cfg.drop_path, cfg.depth).tolist()


MODEL_REGISTRY: Registry[Callable[[ModelConfig], nn.Module]] = Registry("backbone", key="model.backbone")


def register_model(name: str) -> Callable:
    """Class decorator: `@register_model("mixste")` makes `model.backbone: mixste` build that class."""
    return MODEL_REGISTRY.register(name)


def build_model(cfg: ModelConfig | dict) -> nn.Module:
    """Build a registered backbone from its config (a ModelConfig or its plain-dict form)."""
    from h2ot.config import config_from_dict

    if isinstance(cfg, dict):
        cfg = config_from_dict({"kind": "model", "model": cfg}).model
    return MODEL_REGISTRY.get(cfg.backbone)(cfg)


def predict(model: nn.Module, pose_2d: torch.Tensor, test_flip: bool = True) -> PoseOutput:
    """Run the model; with `test_flip`, average with the mirrored input's (mirrored back) prediction.

    pose_2d: [B, T, J, C]. The kept indices returned are those of the unflipped pass.
    """
    out = model(pose_2d)
    if not test_flip:
        return out
    flipped = model(flip_pose(pose_2d))
    if model.training and not torch.equal(out.frame_indices, flipped.frame_indices):
        # a seq2frame model in training mode outputs its kept frames, which may differ between the two passes
        raise ValueError("test-time flip needs the same output frames in both passes; call model.eval() first")
    out.pose_3d = (out.pose_3d + flip_pose(flipped.pose_3d)) / 2
    return out


def check_input(x: torch.Tensor, cfg: ModelConfig) -> None:
    """Raise a clear ValueError unless x is [B, frames, joints, in_channels]."""
    expected = (cfg.frames, cfg.joints, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected input [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(x.shape)}")


def prepare_input(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """check_input, then (cfg.center_2d) the keypoints relative to the root joint (joint 0) of their frame."""
    check_input(x, cfg)
    if not cfg.center_2d:
        return x
    xy = x[..., :2] - x[..., :1, :2]
    return torch.cat([xy, x[..., 2:]], dim=-1) if x.shape[-1] > 2 else xy


class JointTokenBackbone(nn.Module):
    """The shared start of the spatio-temporal backbones: each joint's 2D input embedded to C channels plus learned
    spatial (per joint) and temporal (per frame) position codes -> tokens [B, T, J, C]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_channels, cfg.dim)
        self.spatial_pos = nn.Parameter(torch.zeros(1, 1, cfg.joints, cfg.dim))
        self.temporal_pos = nn.Parameter(torch.zeros(1, cfg.frames, 1, cfg.dim))
        nn.init.trunc_normal_(self.spatial_pos, std=0.02)
        nn.init.trunc_normal_(self.temporal_pos, std=0.02)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, J, in_channels] -> [B, T, J, C]."""
        return self.embed(prepare_input(x, self.cfg)) + self.spatial_pos + self.temporal_pos
