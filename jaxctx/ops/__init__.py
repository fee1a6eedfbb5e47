"""Kernels: attention, blockwise feed-forward, chunked cross-entropy. They know nothing about models."""

from jaxctx.ops.attention import IMPLS, attention, resolve_impl
from jaxctx.ops.blockwise import blockwise_attention
from jaxctx.ops.reference import reference_attention

__all__ = ["IMPLS", "attention", "resolve_impl", "blockwise_attention", "reference_attention"]
from jaxctx.ops.feedforward import (blockwise_feedforward, chunked_cross_entropy, cross_entropy, project_logits,
                                    token_cross_entropy)

__all__ += ["blockwise_feedforward", "chunked_cross_entropy", "cross_entropy", "project_logits",
            "token_cross_entropy"]
from jaxctx.ops.ring import (from_layout, from_layout_index, ring_attention, ring_attention_in_layout, ring_traffic,
                             ring_work, to_layout, to_layout_index)

__all__ += ["from_layout", "from_layout_index", "ring_attention", "ring_attention_in_layout", "ring_traffic",
            "ring_work", "to_layout", "to_layout_index"]
from jaxctx.ops.dropout import attention_dropout_mask, hidden_dropout

__all__ += ["attention_dropout_mask", "hidden_dropout"]
