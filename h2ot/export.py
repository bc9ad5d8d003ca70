"""A whole H2OT model as one ONNX graph, and the same model run back through ONNX Runtime.

`export_onnx` writes the model's forward pass (embedding, blocks, the TPMs' scoring, top-n selection and gather,
the TRM, the head) as one graph with a dynamic batch axis (torch.onnx.export with dynamo=True). The graph has one
input and these outputs (every one [batch, ...]):

    keypoints_2d   [B, frames, joints, in_channels] float32: normalised screen coordinates (h2ot.keypoints)
    pose_3d        [B, T_out, joints, 3] float32: metres, root-relative camera frame (T_out = frames, or 1 for a
                   seq2frame model)
    frame_indices  [B, T_out] int64: the original frame of each output frame
    kept_<s>       [B, n_s] int64: the frames pruning stage s kept (time order), one output per stage

The file's metadata (`read_metadata`) says what the model expects and where it came from: frames, joints, input
channels and layout, schedule, TPM, TRM, the model config as JSON, the checkpoint's SHA-256 and the code revision.
`OnnxPoseModel` runs such a file and returns `PoseOutput` like a torch model, so `h2ot.models.predict`,
`h2ot.inference.infer_sequence` and evaluation loops take it unchanged. Self-attention layers are written as ONNX
Runtime's fused com.microsoft Attention node (`fused_attention`; `fuse_attention=False` for standard operators).
Needs the `export` extra (onnx, onnxscript, onnxruntime), imported only here and only when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.models.base import PoseOutput

log = logging.getLogger(__name__)

INPUT_NAME = "keypoints_2d"
INPUT_LAYOUT = ("[batch, frames, joints, channels] float32: normalised screen x, y (VideoPose3D's "
                "normalize_screen_coordinates) [, confidence]; Human3.6M-17 joint order")
EXPORT_FORMAT = "1"  # bumped when the inputs, outputs or metadata change meaning
EXAMPLE_BATCH = 2  # a batch of 1 would let the exporter specialise the batch axis to 1


class ExportError(ValueError):
    """The model cannot be exported (a strategy without an ONNX form) or the export does not match PyTorch."""


def output_names(cfg: ModelConfig) -> list[str]:
    return ["pose_3d", "frame_indices"] + [f"kept_{s}" for s in range(len(cfg.stages))]


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ExportError naming the strategy when the model's TPM or TRM has no ONNX form."""
    from h2ot.pruning import TPM_REGISTRY
    from h2ot.recovery import TRM_REGISTRY

    if not cfg.stages:
        return
    tpm = TPM_REGISTRY.get(cfg.tpm)
    if tpm is not None and not tpm.exportable:
        raise ExportError(
            f"model.tpm {cfg.tpm!r} cannot be exported to ONNX (its frame choice is drawn from a torch random "
            f"generator, which a graph cannot hold); exportable strategies: "
            f"{sorted(k for k, v in TPM_REGISTRY.items() if v.exportable)}"
        )
    trm = TRM_REGISTRY.get(cfg.trm)
    if not cfg.seq2frame and trm is not None and not trm.exportable:
        raise ExportError(f"model.trm {cfg.trm!r} cannot be exported to ONNX")


# --------------------------------------------------------------------------------- fused self-attention
# Exported plainly, one self-attention layer is a chain of about 20 nodes (qkv MatMul, bias Add, Reshape, Transpose,
# three Slice+Squeeze, a Reshape/Transpose/Reshape for K^T, two scaling Muls, MatMul, Softmax, MatMul, Transpose,
# Reshape), and ONNX Runtime spends a quarter of a paper-size MixSTE's time outside its MatMuls, most of it copying
# q, k and v between layouts. ONNX Runtime's com.microsoft Attention kernel computes the same thing (qkv projection
# with packed weights, softmax(q k^T / sqrt(d)) v per head, heads merged) in one node. The exporter writes that node
# for every `h2ot.layers.Attention` that does not record attention (an attention-scored TPM reads the weights):
# each such layer's qkv projection and attention go through the custom op h2ot::self_attention while exporting,
# and the op is translated to the contrib node. Eager models never call the op.
ORT_CONTRIB_DOMAIN = "com.microsoft"
_op_registered = False


def _self_attention_op():
    """The custom op h2ot::self_attention(x [N, L, C], qkv_weight [3C, C], qkv_bias [3C], heads) -> [N, L, C]: what
    `Attention.forward` computes before its output projection (registered on first use)."""
    global _op_registered
    if not _op_registered:
        import torch.nn.functional as F

        @torch.library.custom_op("h2ot::self_attention", mutates_args=())
        def self_attention(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                           heads: int) -> torch.Tensor:
            n, length, _ = x.shape
            dim = qkv_weight.shape[0] // 3
            qkv = F.linear(x, qkv_weight, qkv_bias).view(n, length, 3, heads, dim // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)

        @self_attention.register_fake
        def _(x, qkv_weight, qkv_bias, heads):
            return x.new_empty(x.shape[0], x.shape[1], qkv_weight.shape[0] // 3)

        _op_registered = True
    return torch.ops.h2ot.self_attention.default


def _ort_attention(x, qkv_weight, qkv_bias, heads: int):
    """h2ot::self_attention as ONNX Runtime's contrib Attention (weights [C, 3C]: q, k, v columns, heads inside)."""
    import onnxscript
    from onnxscript import opset18 as op

    attention = onnxscript.values.Op(onnxscript.values.Opset(ORT_CONTRIB_DOMAIN, 1), "Attention",
                                     _contrib_attention_schema())
    return attention(x, op.Transpose(qkv_weight, perm=[1, 0]), qkv_bias, num_heads=heads)


def _contrib_attention_schema():
    """The part of com.microsoft Attention's signature used here (onnx ships no schema for contrib ops; ONNX
    Runtime's own: input [B, S, C], weights [C, 3C], bias [3C], attribute num_heads -> output [B, S, C])."""
    from onnx.defs import OpSchema

    def tensor(name: str) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, "T")

    return OpSchema(
        "Attention", ORT_CONTRIB_DOMAIN, 1,
        inputs=[tensor("input"), tensor("weights"), tensor("bias")], outputs=[tensor("output")],
        type_constraints=[("T", ["tensor(float)"], "float32 only here")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of attention heads")],
    )


def _fused_forward(module: nn.Module, plain, x: torch.Tensor, attn_sink: dict | None = None) -> torch.Tensor:
    if attn_sink is not None or module.training:
        return plain(x, attn_sink)
    return module.proj(_self_attention_op()(x, module.qkv.weight, module.qkv.bias, module.heads))


@contextlib.contextmanager
def fused_attention(model: nn.Module):
    """While exporting: every h2ot.layers.Attention of `model` computes its attention through h2ot::self_attention
    (exported as one com.microsoft Attention node); restored afterwards."""
    from h2ot.layers import Attention

    patched = [m for m in model.modules() if isinstance(m, Attention)]
    for m in patched:
        m.forward = functools.partial(_fused_forward, m, m.forward)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class _GraphOutputs(nn.Module):
    """The model's PoseOutput as the flat tuple of tensors a graph returns (see output_names)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return (out.pose_3d, out.frame_indices, *out.kept_indices)


def export_onnx(model: nn.Module, cfg: ModelConfig, path: str | Path, metadata: dict[str, str] | None = None,
                opset: int | None = None, fuse_attention: bool = True) -> Path:
    """Write `model` (eval mode) as one ONNX graph with a dynamic batch axis; `metadata` is added to the file's
    own (model_metadata). Returns the path.

    `fuse_attention`: self-attention layers as ONNX Runtime's com.microsoft Attention node (see fused_attention);
    False writes standard ONNX operators only (for runtimes other than ONNX Runtime)."""
    import onnx

    check_exportable(cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(EXAMPLE_BATCH, cfg.frames, cfg.joints, cfg.in_channels)
    example.normal_(generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    kwargs = {"opset_version": opset} if opset else {}
    if fuse_attention:
        kwargs["custom_translation_table"] = {_self_attention_op(): _ort_attention}
    with torch.no_grad(), fused_attention(model) if fuse_attention else contextlib.nullcontext():
        program = torch.onnx.export(
            _GraphOutputs(model).eval(), (example,), input_names=[INPUT_NAME], output_names=output_names(cfg),
            dynamic_shapes=({0: batch},), dynamo=True, verbose=False, **kwargs,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path))
    proto = onnx.load(str(path))
    meta = {**model_metadata(cfg), **(metadata or {})}
    fused = sum(n.domain == ORT_CONTRIB_DOMAIN and n.op_type == "Attention" for n in proto.graph.node)
    if fused:
        meta["fused_attention"] = f"{fused} {ORT_CONTRIB_DOMAIN} Attention nodes (ONNX Runtime only)"
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    onnx.save(proto, str(path))
    return path


def model_metadata(cfg: ModelConfig) -> dict[str, str]:
    """What the graph expects and computes, as the string pairs ONNX metadata holds."""
    return {
        "h2ot_export_format": EXPORT_FORMAT,
        "frames": str(cfg.frames),
        "joints": str(cfg.joints),
        "input_channels": str(cfg.in_channels),
        "input_layout": INPUT_LAYOUT,
        "output_units": "metres, root-relative camera frame (x right, y down, z forward)",
        "backbone": cfg.backbone,
        "schedule": json.dumps(cfg.schedule),
        "tpm": cfg.tpm if cfg.stages else "none",
        "trm": cfg.trm if cfg.stages and not cfg.seq2frame else "none",
        "seq2frame": str(cfg.seq2frame).lower(),
        "model_config": json.dumps(dataclasses.asdict(cfg)),
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of an exported file (model_metadata plus what the exporter added)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def config_from_metadata(meta: dict[str, str], source: str = "ONNX file") -> ModelConfig:
    from h2ot.config import config_from_dict

    if "model_config" not in meta:
        raise ExportError(f"{source}: no h2ot model_config in its metadata (not written by `h2ot export`)")
    return config_from_dict({"kind": "model", "model": json.loads(meta["model_config"])}).model


class OnnxPoseModel:
    """An exported model run by ONNX Runtime, called like the torch model: x [B, T, J, C] -> PoseOutput.

    `eval()`, `train(False)` and `to("cpu")` are accepted (and do nothing), so code written for torch models runs
    it as is. int8 files made by `quantize_int8` load the same way."""

    training = False

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spin:  # idle threads sleep instead of busy-waiting for the next run (other work shares the cores)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.cfg = config_from_metadata(self.metadata, str(self.path))
        self._outputs = [o.name for o in self.session.get_outputs()]
        if "fused_attention" not in self.metadata and self.cfg.backbone != "mlp":
            log.info("%s: self-attention in standard ONNX operators (exported with --standard-ops or before fused "
                     "attention); `h2ot export` writes the faster fused graph", self.path)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self._outputs, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})

    def __call__(self, x: torch.Tensor) -> PoseOutput:
        pose, frame_indices, *kept = self.run(x.detach().cpu().float().numpy())
        return PoseOutput(torch.from_numpy(pose), [torch.from_numpy(k) for k in kept], torch.from_numpy(frame_indices))

    def eval(self) -> OnnxPoseModel:
        return self

    def train(self, mode: bool = True) -> OnnxPoseModel:
        if mode:
            raise ValueError("an ONNX model cannot be trained")
        return self

    def to(self, device: Any) -> OnnxPoseModel:
        if torch.device(device).type != "cpu":
            raise ValueError("this ONNX model runs on the CPU (ONNX Runtime's CPU provider); use device cpu")
        return self


@dataclasses.dataclass
class Agreement:
    """How an exported model agrees with PyTorch on the same windows."""

    windows: int
    max_abs_diff_m: float  # over every joint and coordinate
    kept_equal: bool  # every stage's kept frames identical in every window
    windows_with_other_frames: int

    def ok(self, tolerance_m: float) -> bool:
        return self.kept_equal and self.max_abs_diff_m <= tolerance_m


@torch.no_grad()
def compare(model: nn.Module, exported: OnnxPoseModel, windows: torch.Tensor, batch_size: int = 16) -> Agreement:
    """Run both models on windows [N, T, J, C] (no flip) and compare poses and kept frames."""
    model = model.eval()
    worst, other = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size]
        ref, got = model(x), exported(x)
        worst = max(worst, float((ref.pose_3d.float() - got.pose_3d).abs().max()))
        differs = torch.zeros(len(x), dtype=torch.bool)
        for a, b in zip(ref.kept_indices, got.kept_indices):
            differs |= (a.cpu() != b).any(dim=1)
        other += int(differs.sum())
    return Agreement(len(windows), worst, other == 0, other)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization of the MatMul / Gemm / fused Attention weights (activations quantized
    on the fly); the metadata is kept."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    ops = ["MatMul", "Gemm", "Attention"]  # a fused Attention's qkv weights become com.microsoft QAttention's
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=ops)
    meta = read_metadata(src)
    meta["precision"] = f"int8 dynamic (weights QInt8; {', '.join(ops)})"
    proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(dst))
    return dst
