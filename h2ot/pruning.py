"""Token Pruning Modules (TPM): choose which frame tokens to keep.

Each strategy scores the current frame tokens (higher = keep); `TokenPruner.forward` keeps the top-n,
re-sorts them in time order, gathers their joint tokens and maps the kept positions back to ORIGINAL frame
indices. Frames in `must_keep` (the centre frame of seq2frame models) are always kept.
Registry: TPM_REGISTRY["dpc_knn" | "uniform" | "motion" | "attention" | "random"].
Each strategy also states the FLOPs of its scoring (`scoring_flops`), for h2ot.flops.

Everything here exports to one ONNX graph (h2ot.export) except `random`, which says so (`exportable = False`):
the distances are one explicit formula in every runtime, and the selection breaks ties by position in each (a
stable sort in eager mode, ONNX's TopK in an exported graph, a rank count under torch.compile), so eager and
exported models keep the same frames. Scoring runs without autograd and at least in fp32 (DPC-kNN in float64
from its distances on), also inside autocast: nothing backpropagates through the scores, and half-precision
distances would reorder near-equal frames.

Batch-1 cost: a small model's pruning stage is a couple of dozen tiny tensor ops, each costing microseconds of
dispatch whatever its size, so their number is what matters. Tensors that depend only on a token count (positions,
the "j comes after i" masks) are built once per count and device (`length_constant`); DPC-kNN ranks by a monotone
function of its score that needs fewer ops (DpcKnnPruner), and avoids ops that a single one can do (`amax` /
`amin` without indices).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable

import torch
from torch import nn

from h2ot.config import ModelConfig
from h2ot.layers import ATTENTION_RECEIVED
from h2ot.registry import Registry

TPM_REGISTRY: Registry[type[TokenPruner]] = Registry("pruning strategy", key="model.tpm")


def register_tpm(name: str) -> Callable:
    def decorator(cls: type[TokenPruner]) -> type[TokenPruner]:
        TPM_REGISTRY.register(name, cls)
        cls.name = name
        return cls

    return decorator


def build_tpm(cfg: ModelConfig) -> TokenPruner:
    return TPM_REGISTRY.get(cfg.tpm)(cfg)


class TokenPruner(nn.Module):
    """Base class: subclasses implement `scores(x, n, context) -> [B, T']`."""

    name = "base"
    exportable = True  # False: cannot be written as one ONNX graph (h2ot.export names it)
    uses_attention = False  # True: the block before the stage records its temporal attention (h2ot.hourglass)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def scoring_flops(
        cls, cfg: ModelConfig, t: int, block: int, temporal_attentions: int, tokens_per_frame: int
    ) -> tuple[int, int]:
        """FLOPs of scoring t frames at a stage before `block`, for a backbone whose blocks hold
        `temporal_attentions` temporal attentions and split a frame into `tokens_per_frame` tokens (J, or 1):
        (by hand: what torch's FlopCounterMode does not see, such as distances and elementwise work; counted: the
        matmuls it does see)."""
        return 0, 0

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        raise NotImplementedError

    def fixed_positions(self, t: int, n: int) -> list[int] | None:
        """The positions of the n tokens of t that the strategy keeps whatever the tokens are (without frames that
        must be kept), or None when they depend on the tokens. Fixed positions let the hourglass hold every stage's
        kept frames, and the TRM its weights, as constants (h2ot.hourglass)."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        n: int,
        frame_indices: torch.Tensor | None,
        must_keep: torch.Tensor | None = None,
        context: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep n frames. x: [B, T', J, C]; frame_indices: [B, T'] original positions of those tokens, or None
        when they are the original frames in order (then the kept positions are the kept original indices).

        Returns (x_kept [B, n, J, C], kept original indices [B, n], sorted in time).
        """
        t = x.shape[1]
        if n > t:
            raise ValueError(f"cannot keep {n} tokens of {t}")
        autocast = _autocast_enabled(x)
        if torch.is_grad_enabled() or autocast:
            off = torch.autocast(device_type=x.device.type, enabled=False) if autocast else contextlib.nullcontext()
            with torch.no_grad(), off:
                local = self._select(x, n, must_keep, context)
        else:  # inference without autocast: nothing to turn off (entering contexts costs microseconds at batch 1)
            local = self._select(x, n, must_keep, context)
        return take_frames(x, local), local if frame_indices is None else torch.gather(frame_indices, 1, local)

    def _select(
        self, x: torch.Tensor, n: int, must_keep: torch.Tensor | None, context: dict | None
    ) -> torch.Tensor:
        """Positions [B, n] of the kept tokens, in time order: the top-n scores, must_keep first."""
        scores = self.scores(_fp32(x), n, context or {})
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()
        if must_keep is not None:
            scores = scores.masked_fill(must_keep, math.inf)
        return top_n_in_time_order(scores, n)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (scoring turns it off: fp32 distances; export graphs hold none)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta, used by the device tests): nothing to turn off
        return False


def take_frames(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, T, J, C] at the frame positions [B, n] -> [B, n, J, C] (a copy: exact). At batch 1 in eager mode one
    index_select instead of a view, an expand and a gather (traced graphs keep the gather, for any batch)."""
    b, _, j, c = x.shape
    if not torch.compiler.is_compiling() and b == 1:
        return x.index_select(1, positions[0])
    return torch.gather(x, 1, positions.view(b, -1, 1, 1).expand(-1, -1, j, c))


_LENGTH_CONSTANTS: dict[tuple[Hashable, int, torch.device], torch.Tensor] = {}


def length_constant(
    name: Hashable, length: int, device: torch.device, build: Callable[[int, torch.device], torch.Tensor]
) -> torch.Tensor:
    """The tensor build(length, device), which depends only on a token count: built once per (name, length,
    device) in eager mode and reused; built afresh while torch.compile or torch.export traces or a FakeTensorMode
    is active, so that the graph holds it as a constant and no traced (fake) tensor is kept. Callers never modify
    it in place. The name may be any hashable (a tuple of ints hashes in a fraction of the time formatting it
    into a string takes, on every forward)."""
    if torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return build(length, device)
    key = (name, length, device)
    cached = _LENGTH_CONSTANTS.get(key)
    if cached is None:
        # Outside inference mode: an inference tensor could not be used by a later forward that records autograd.
        with torch.inference_mode(False), torch.no_grad():
            cached = _LENGTH_CONSTANTS[key] = build(length, device)
    return cached


def frame_positions(frames: int, device: torch.device) -> torch.Tensor:
    """[T] long: 0 .. T-1, built once per length and device."""
    return length_constant("positions", frames, device, lambda t, d: torch.arange(t, device=d))


def index_constant(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[n] long: the given positions as a tensor, built once per tuple and device."""
    return length_constant(("index", values), len(values), device, lambda _, d: torch.tensor(values, device=d))


def _comes_before(t: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, [i, j]: token j comes before token i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril(-1)


def _comes_after(t: int, device: torch.device) -> torch.Tensor:
    """[T, T] bool, [i, j]: token j comes after token i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).triu(1)


def _reverse_positions(t: int, device: torch.device) -> torch.Tensor:
    """[T] long: T - i, distinct and > 0, largest for the first token."""
    return torch.arange(t, 0, -1, device=device)


def top_n_in_time_order(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Positions [B, n] of the n highest scores [B, T], in time order; equal scores rank by position (the lower
    first), as a stable descending sort would.

    Eager mode runs that stable sort (three ops). An ONNX export writes TopK, whose specification breaks ties
    toward the lower index, as the stable sort does (two nodes; tests/test_export.py checks it on ties). Under
    torch.compile, whose top-k promises no order among ties, `top_n_by_rank` gives the same positions
    (tests/test_pruning_reference.py checks it on ties)."""
    if torch.onnx.is_in_onnx_export():
        # the positions in time order by a second TopK of constant k (a sort would read k from the shape: 3 nodes more)
        return scores.topk(n, dim=1).indices.topk(n, dim=1, largest=False).values
    if torch.compiler.is_compiling():
        return top_n_by_rank(scores, n)
    return scores.argsort(dim=1, descending=True, stable=True)[:, :n].sort(dim=1).values


def top_n_by_rank(scores: torch.Tensor, n: int) -> torch.Tensor:
    """top_n_in_time_order with comparisons and a top-k on distinct keys (for torch.compile, whose sorts and top-k
    promise no order among ties), the same positions in every runtime: the rank of token i is the number of tokens
    that beat it (a higher score, or the same score earlier); the n tokens of rank < n get the key T - i (distinct,
    > 0) and the rest 0, so top-k of the keys lists the kept tokens from the earliest on."""
    t, device = scores.shape[1], scores.device
    s_i, s_j = scores.unsqueeze(2), scores.unsqueeze(1)
    # j beats i: a higher score, or the same score earlier
    beats = (s_j > s_i) | ((s_j == s_i) & length_constant("before", t, device, _comes_before))
    rank = beats.sum(dim=2)  # [B, T]
    key = torch.where(rank < n, length_constant("reverse_positions", t, device, _reverse_positions), 0)
    return key.topk(n, dim=1).indices


def frame_features(x: torch.Tensor) -> torch.Tensor:
    """Frame features [B, T', C] in fp32: the mean of a frame's tokens [B, T', J, C]. One token a frame (frame-token
    backbones) is its own mean, to the bit: taken as it is, without a reduction."""
    return _fp32(x[:, :, 0] if x.shape[2] == 1 else x.mean(dim=2))


def pairwise_sq_distances(feat: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [B, T, T] in float64 between the rows of feat [B, T, C], exactly symmetric with
    an exact zero diagonal, in ops that export to ONNX (torch.cdist does not).

    Why: DPC-kNN compares densities and scores built from these distances, and two runtimes (PyTorch, ONNX
    Runtime) must rank them the same way. The matrix-product formula |a|^2 + |b|^2 - 2 a.b is the only one whose
    cost does not grow with T^2 x C of memory (direct differences materialise [B, T, T, C]: 48 MB for 64 clips of
    the frame-token model, slower than its blocks), but in fp32 it loses the digits a and b share (a trained
    model's close frames were off by 5e-5 of their distance, rounded differently in each runtime). So it runs in
    float64 (fp32 products are exact there; what is lost is ~1e-16 of |a|^2), as h + h^T with h_ij = |a_i|^2 - a_i.a_j
    (exactly symmetric), where |a_i|^2 is the Gram matrix's own diagonal (so d(a, a) = 0 exactly). Symmetry matters
    because with k = 2 the densities of two frames that are each other's nearest neighbours are equal: exactly
    equal, every runtime breaks the tie by frame index; equal up to rounding, the runtimes kept different frames.
    float64 also keeps a GPU's TF32 matrix products out of it. A distance may come out a few 1e-16 below zero
    (near-equal frames); DPC-kNN clamps where it matters."""
    f = feat.double()
    gram = torch.bmm(f, f.transpose(1, 2))
    t = feat.shape[1]
    # |a|^2 [B, T, 1]: the diagonal's own numbers, so h_ii = 0 exactly (as a strided view: two ONNX nodes, where
    # `diagonal` exports as fourteen)
    sq = gram.reshape(-1, t * t, 1)[:, :: t + 1]
    half = sq - gram
    return half + half.transpose(1, 2)  # h_ij + h_ji and h_ji + h_ij: the same number (addition commutes)


@register_tpm("dpc_knn")
class DpcKnnPruner(TokenPruner):
    """Density-peaks clustering with k nearest neighbours (HoT): keep cluster centres of the frame features.

    1. frame feature = mean of its joint tokens; 2. distances / sqrt(C); 3. density rho = exp(-mean of the
    squared distances to the k nearest neighbours, self included); 4. delta = distance to the nearest denser
    frame (the densest frame gets the largest distance of the sample); 5. score rho * delta.
    Ties are broken by frame index (an exact index-based order, not random noise), so evaluation is
    deterministic.

    Computed as a strictly increasing function of rho * delta, in float64 on squared distances d: with S the sum
    of a frame's k smallest d and D its d to the nearest denser frame, 2 log(rho * delta) + log C = log D - 2 S / (C k).
    The same order in exact arithmetic, with no square root, exponential or product ([B, T'] logs instead): a small
    model's batch-1 forward pays microseconds per op, and this scores in 16 ops where the direct formula took 23.
    A frame is denser when its S is smaller (rho falls as S grows); float64 tells apart densities that fp32 would
    round to one value (which then the frame index ordered).
    """

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        t, c = x.shape[1], x.shape[3]
        d = pairwise_sq_distances(frame_features(x))  # [B, T', T'] float64
        k = min(self.cfg.tpm_k, t)
        knn = d.topk(k, dim=-1, largest=False).values.sum(dim=-1)  # S [B, T']: smaller = denser
        # [i, j]: j is denser than i; equal densities are ordered by frame index (exact, deterministic).
        s_i, s_j = knn.unsqueeze(2), knn.unsqueeze(1)
        after = length_constant("after", t, x.device, _comes_after)
        denser = (s_j < s_i) | ((s_j == s_i) & after)  # no `where` on booleans: ONNX Runtime has none
        to_denser = torch.where(denser, d, d.amax(dim=(1, 2), keepdim=True)).amin(dim=-1)  # D [B, T']
        # log 0 = -inf: a frame equal to a denser one ranks last (the clamp removes rounding's tiny negatives)
        return to_denser.clamp_(min=0.0).log_().sub_(knn, alpha=2.0 / (c * k))

    @classmethod
    def scoring_flops(
        cls, cfg: ModelConfig, t: int, block: int, temporal_attentions: int, tokens_per_frame: int
    ) -> tuple[int, int]:
        # frame mean (T'JC), pairwise distances (3 T'^2 C) and the density / delta terms (~4 T'^2).
        return t * tokens_per_frame * cfg.dim + 3 * t * t * cfg.dim + 4 * t * t, 0


@register_tpm("uniform")
class UniformPruner(TokenPruner):
    """Keep n frames evenly spaced over the current tokens (first and last included).

    The positions depend only on the token counts, so without frames that must be kept no scores are computed:
    the top-n of `scores` is built once per (T', n) and device (distinct positions, as n <= T'), which leaves a
    stage only its gathers at batch 1."""

    def _select(
        self, x: torch.Tensor, n: int, must_keep: torch.Tensor | None, context: dict | None
    ) -> torch.Tensor:
        if must_keep is not None:
            return super()._select(x, n, must_keep, context)
        picks = length_constant(("uniform", n), x.shape[1], x.device, lambda t, device: _even_picks(t, n, device))
        return picks.expand(x.shape[0], n)

    def fixed_positions(self, t: int, n: int) -> list[int]:
        return _even_picks(t, n, torch.device("cpu")).tolist()

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t = x.shape[:2]
        scores = torch.zeros(b, t, device=x.device)
        scores[:, _even_picks(t, n, x.device)] = 1.0
        return scores


def _even_picks(t: int, n: int, device: torch.device) -> torch.Tensor:
    """[n] long: n positions of t evenly spaced, the first and the last included."""
    return torch.linspace(0, t - 1, n, device=device).round().long()


@register_tpm("motion")
class MotionPruner(TokenPruner):
    """Keep the frames that move most: score = displacement of the frame feature (mean of its joint tokens)
    from the previous current token; the first token takes its displacement to the next one."""

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        feat = frame_features(x)  # [B, T', C]
        if feat.shape[1] < 2:
            return torch.zeros(feat.shape[:2], device=x.device)
        step = (feat[:, 1:] - feat[:, :-1]).norm(dim=-1)  # [B, T'-1]: token t-1 -> t
        return torch.cat([step[:, :1], step], dim=1)

    @classmethod
    def scoring_flops(
        cls, cfg: ModelConfig, t: int, block: int, temporal_attentions: int, tokens_per_frame: int
    ) -> tuple[int, int]:
        # frame mean (T'JC), differences, squares and sums (3 T'C)
        return t * tokens_per_frame * cfg.dim + 3 * t * cfg.dim, 0


@register_tpm("attention")
class AttentionPruner(TokenPruner):
    """Keep the frames that receive the most temporal attention in the block before the stage.

    That block's temporal attention records, per joint sequence, the softmax weights each frame receives summed
    over heads and queries (context[ATTENTION_RECEIVED], [B*J, T']); the score of a frame sums them over the
    joints. Before block 0 there is no block, and a backbone may not record: then one parameter-free attention
    over the frame features f (mean of the joint tokens), softmax(f f^T / sqrt(C)), gives the column sums.
    """

    uses_attention = True

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t, _, c = x.shape
        received = context.get(ATTENTION_RECEIVED)
        if received is not None:
            if received.shape[-1] != t or received.numel() % (b * t):
                raise ValueError(f"recorded attention {tuple(received.shape)} does not match tokens {tuple(x.shape)}")
            return received.reshape(b, -1, t).sum(dim=1)
        feat = frame_features(x)  # [B, T', C]
        weights = (feat @ feat.transpose(1, 2) / math.sqrt(c)).softmax(dim=-1)
        return weights.sum(dim=1)

    @classmethod
    def scoring_flops(
        cls, cfg: ModelConfig, t: int, block: int, temporal_attentions: int, tokens_per_frame: int
    ) -> tuple[int, int]:
        if block > 0 and temporal_attentions > 0:
            # column sums of the recorded weights (heads x queries per key) of every temporal attention of the
            # block before, then the sum over the joints; the attention products themselves are the block's own.
            return temporal_attentions * tokens_per_frame * cfg.heads * t * t + tokens_per_frame * t, 0
        # fallback: frame mean and column sums by hand; f f^T is a matmul the counter sees.
        return t * tokens_per_frame * cfg.dim + t * t, 2 * t * t * cfg.dim


@register_tpm("random")
class RandomPruner(TokenPruner):
    """Keep n random frames (a baseline). Seeded by `model.tpm_seed`: training draws a fresh selection every
    call from a generator seeded once; evaluation reseeds on every call, so it is deterministic.
    Not exportable: its draws come from a torch.Generator that an ONNX graph cannot hold."""

    exportable = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self._generator = torch.Generator().manual_seed(cfg.tpm_seed)

    def scores(self, x: torch.Tensor, n: int, context: dict) -> torch.Tensor:
        b, t = x.shape[:2]
        if self.training:
            generator = self._generator
        else:
            generator = torch.Generator().manual_seed(self.cfg.tpm_seed * 1_000_003 + t)
        return torch.rand(b, t, generator=generator).to(x.device)
