"""Attention-based MIL pooling of Ilse, Tomczak & Welling, ICML 2018 (Eq. 8 and the gated Eq. 9)."""

from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    """Pool N instances into one vector with learned attention weights.

    Gated (Eq. 9):  a_n = softmax_n( w^T ( tanh(V h_n) * sigmoid(U h_n) ) )
    Plain (Eq. 8):  a_n = softmax_n( w^T tanh(V h_n) )
    Output:         z = sum_n a_n h_n

    Padded instances (``mask`` False) get zero weight, so a padded batch gives the same result as each image
    alone.

    Args:
        in_dim: M, the instance dimension.
        attn_dim: L, the hidden attention dimension.
        gated: use the sigmoid gate of Eq. 9.
    """

    def __init__(self, in_dim: int, attn_dim: int = 128, gated: bool = True) -> None:
        super().__init__()
        self.attention_V = nn.Linear(in_dim, attn_dim)  # V in Ilse et al. Eq. 8/9
        self.attention_U = nn.Linear(in_dim, attn_dim) if gated else None  # U, the gate of Eq. 9
        self.attention_w = nn.Linear(attn_dim, 1, bias=False)  # w (a bias would cancel in the softmax)

    @property
    def gated(self) -> bool:
        return self.attention_U is not None

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool instances.

        Args:
            h: instances, (B, N, M).
            mask: (B, N) bool, True for real instances; None = all real.

        Returns:
            z: the pooled vector, (B, M).
            a: attention weights, (B, N), summing to 1 over the real instances of each bag.
        """
        hidden = torch.tanh(self.attention_V(h))  # (B, N, L)
        if self.attention_U is not None:
            hidden = hidden * torch.sigmoid(self.attention_U(h))
        scores = self.attention_w(hidden).squeeze(-1)  # (B, N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        a = torch.softmax(scores.float(), dim=1).to(h.dtype)  # (B, N)
        z = torch.bmm(a.unsqueeze(1), h).squeeze(1)  # (B, M)
        return z, a
