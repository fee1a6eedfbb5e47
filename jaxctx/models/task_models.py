"""Task models: each family's backbone (its param tree unchanged, the LM head left out) with a task head.

`jaxctx.models.build(cfg)` returns one of these when model.task != lm. The heads, the token each sequence head
reads and the losses are in `jaxctx.models.heads`; here only the wiring to the backbones:

    BertTaskModel   -> BertForSequenceClassification / BertForTokenClassification  (encoder output)
    CausalTaskModel -> GPT2For* / LlamaFor{Sequence,Token}Classification            (final-norm hidden states)

Methods: `__call__(input_ids, segment_ids=, positions=, token_type_ids=)` -> [B, N] or [B, T, N] f32;
`example_logits(input_ids, cls_index, ...)` -> [B, E, N] (packed sequence examples); `task_loss(input_ids,
labels, weights, ..., cls_index=)` -> (loss_sum, weight_sum); `task_hidden(...)` -> [B, T, D].
"""

from __future__ import annotations

from jaxctx.models import heads
from jaxctx.models.bert import BertMLM
from jaxctx.models.gpt import CausalLM


class BertTaskModel(BertMLM):
    """BERT encoder + pooler/classifier (no MLM head)."""

    def setup(self):
        self.setup_encoder()
        heads.setup_heads(self)

    def task_hidden(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Encoder output [B, T, D] (HF last_hidden_state)."""
        return self.encode(input_ids, segment_ids, positions, token_type_ids)

    __call__ = heads.task_call
    example_logits = heads.example_logits
    task_loss = heads.task_loss
    loss = heads.no_lm_loss


class CausalTaskModel(CausalLM):
    """GPT-2 / LLaMA decoder + score/classifier (no LM head)."""

    def setup(self):
        self.setup_trunk()
        heads.setup_heads(self)

    def task_hidden(self, input_ids, segment_ids=None, positions=None, token_type_ids=None):
        """Final-norm hidden states [B, T, D] (HF last_hidden_state)."""
        return self.hidden(input_ids, segment_ids, positions, token_type_ids)

    __call__ = heads.task_call
    example_logits = heads.example_logits
    task_loss = heads.task_loss
    loss = heads.no_lm_loss
