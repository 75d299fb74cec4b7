"""Model hyper-parameters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    sliding_window: int | None = None  # None: full causal attention (Llama)
    max_seq_len: int = 8192  # context length; the cache size when there is no window
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"ModelArgs: sliding_window must be >= 1 or None, got {self.sliding_window}")
        if not self.norm_eps > 0 or not self.rope_theta > 1:
            raise ValueError(f"ModelArgs: need norm_eps > 0 and rope_theta > 1, got {self.norm_eps}, {self.rope_theta}")

    @classmethod
    def mistral_7b(cls) -> "ModelArgs":
        """The configuration of the paper's table (arXiv 2310.06825)."""
        return cls(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                   vocab_size=32000, norm_eps=1e-5, rope_theta=1e4, sliding_window=4096, max_seq_len=8192)
