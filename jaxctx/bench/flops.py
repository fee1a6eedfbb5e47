"""Useful-FLOP conventions: the numerators of every GFLOP/s and "fraction of matmul rate" jaxctx reports.

We count only the FLOPs an ideal kernel must do, not what a given kernel happens to execute, so that a kernel
that recomputes (blockwise backward) or computes-then-masks (reference, causal) is not rewarded for the waste.

Attention (the FlashAttention papers' convention, Dao et al. 2022/2023):
  forward  = 4 * B * H * T^2 * D    two matmuls per query head, Q K^T and P V, each 2 * T^2 * D multiply-adds
             (x 1/2 when causal: only the lower triangle is useful; we halve exactly rather than count
              T(T+1)/2, so the number is a clean function of T)
  backward = 2.5 * forward          five matmuls (recompute S, dV, dP, dQ, dK) against the forward's two
  fwd+bwd  = 3.5 * forward
H counts query heads: grouped-query attention shares K/V heads but does the same number of score FLOPs.
Softmax, scaling and masking are not counted (they are O(T^2) elementwise, not matmul work).
"""

from __future__ import annotations

from jaxctx.errors import UsageError

# Backward / forward FLOP ratio of attention (see module docstring).
ATTENTION_BACKWARD_RATIO = 2.5

ATTENTION_FLOP_CONVENTION = (
    "useful FLOPs only: forward = 4*B*H*T^2*D (QK^T and PV matmuls), halved when causal; "
    "backward = 2.5 x forward; fwd+bwd = 3.5 x forward; H = query heads; softmax/masking not counted"
)


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, *, causal: bool) -> dict[str, float]:
    """Useful FLOPs of one attention call: {"fwd": ..., "bwd": ..., "fwd_bwd": ...}.

    >>> attention_flops(1, 8, 1024, 64, causal=False)["fwd"]
    2147483648.0
    """
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"attention_flops: {name} must be a positive integer, got {value!r}")
    fwd = 4.0 * batch * heads * seq_len * seq_len * head_dim
    if causal:
        fwd /= 2.0
    bwd = ATTENTION_BACKWARD_RATIO * fwd
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def matmul_flops(n: int) -> float:
    """FLOPs of one n x n by n x n matmul: n^3 multiply-adds = 2 n^3."""
    return 2.0 * n ** 3


# ----------------------------------------------------------------------------------------------------------
# Train step (model FLOPs utilisation)
# ----------------------------------------------------------------------------------------------------------

TRAIN_FLOP_CONVENTION = (
    "model FLOPs per token = 6*N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, App. B), the attention term halved "
    "when causal (6*L*H*Q*T); N = matmul parameters = all parameters except the embedding lookup tables (token, "
    "position, token-type) plus the output head's V*D once (a tied head is the token table used as a matmul); "
    "L layers, H query heads, Q head dim, T sequence length; forward + backward = 3 x forward; rematerialised "
    "(recomputed) FLOPs, softmax, norms and the optimizer update are not counted; MFU = model FLOP/s / peak"
)

# Top-level param-tree entries that are lookup tables (a gather, not a matmul), excluded from N.
EMBEDDING_TABLES = ("token_embed", "pos_embed", "type_embed")


def matmul_param_count(params, *, vocab_size: int, d_model: int, tied: bool) -> dict[str, int]:
    """Parameter counts of an (abstract or concrete, unboxed) param tree under TRAIN_FLOP_CONVENTION.

    Returns {"total", "embedding" (lookup tables), "non_embedding", "head" (V*D counted as matmul), "matmul"
    (= N: non_embedding + head if the head is tied; an untied head is already a non-embedding kernel)}.
    """
    import math

    import jax

    def size(tree) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

    total = size(params)
    embedding = sum(size(params[name]) for name in EMBEDDING_TABLES if name in params)
    non_embedding = total - embedding
    head = vocab_size * d_model
    return {"total": total, "embedding": embedding, "non_embedding": non_embedding, "head": head,
            "matmul": non_embedding + (head if tied else 0)}


def train_flops_per_token(matmul_params: int, *, num_layers: int, heads: int, head_dim: int, seq_len: int,
                          causal: bool) -> dict[str, float]:
    """Model FLOPs of one trained token (forward + backward): {"dense": 6N, "attention": ..., "total": ...}.

    >>> train_flops_per_token(100, num_layers=2, heads=4, head_dim=8, seq_len=16, causal=False)["attention"]
    12288.0
    """
    for name, value in (("matmul_params", matmul_params), ("num_layers", num_layers), ("heads", heads),
                        ("head_dim", head_dim), ("seq_len", seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"train_flops_per_token: {name} must be a positive integer, got {value!r}")
    dense = 6.0 * matmul_params
    attn = 12.0 * num_layers * heads * head_dim * seq_len
    if causal:
        attn /= 2.0
    return {"dense": dense, "attention": attn, "total": dense + attn}
