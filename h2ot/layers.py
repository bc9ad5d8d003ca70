"""Transformer building blocks shared by the backbones: attention (SDPA), MLP, pre-norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Key under which an attention layer asked to record (`attn_sink`) adds the attention each key token receives:
# [N, L] column sums of the softmax weights over heads and queries. The `attention` TPM reads it.
ATTENTION_RECEIVED = "attention_received"


def init_transformer_weights(module: nn.Module) -> None:
    """The ViT / MixSTE / MotionBERT initialisation, for `model.apply`: Linear weights ~ N(0, 0.02) truncated,
    zero biases; LayerNorm (1, 0). PyTorch's default gives the 2-channel joint embedding biases of up to 0.7 that
    drown the keypoints' small coordinates; the small MixSTE then sat near the mean pose for hundreds of steps."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of x: [N, L, C] -> [N, L, C]."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim {dim} must be divisible by model.heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_sink: dict | None = None) -> torch.Tensor:
        """With `attn_sink`, the weights are computed explicitly (SDPA returns none) and their column sums
        [N, L] are added to attn_sink[ATTENTION_RECEIVED]; the output is the same attention."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if attn_sink is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            # q scaled before the product (as SDPA does): unscaled logits of wide heads can pass float16's 65504
            logits = (q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)  # [N, H, L, L]
            weights = logits.softmax(dim=-1, dtype=torch.float32)
            received = weights.detach().sum(dim=(1, 2))  # [N, L]: attention each key token receives
            attn_sink[ATTENTION_RECEIVED] = attn_sink.get(ATTENTION_RECEIVED, 0) + received
            out = F.dropout(weights, p).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries [N, Lq, C] attend to context [N, Lk, C]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim {dim} must be divisible by model.heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, lq, dim = queries.shape
        lk, hd = context.shape[1], dim // self.heads
        q = self.q(queries).view(n, lq, self.heads, hd).transpose(1, 2)
        k, v = self.kv(context).view(n, lk, 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, lq, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample with probability p (training only)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block over [N, L, C]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_sink: dict | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_sink))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def spatial_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, J, C] -> [B*T, J, C]: one sequence of joints per frame."""
    b, t, j, c = x.shape
    return x.reshape(b * t, j, c)


def temporal_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, J, C] -> [B*J, T, C]: one sequence of frames per joint."""
    b, t, j, c = x.shape
    return x.permute(0, 2, 1, 3).reshape(b * j, t, c)


def from_temporal(x: torch.Tensor, b: int, j: int) -> torch.Tensor:
    """[B*J, T, C] -> [B, T, J, C]."""
    _, t, c = x.shape
    return x.reshape(b, j, t, c).permute(0, 2, 1, 3)
