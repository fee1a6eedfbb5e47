"""BertForPreTraining's loss (MLM + next-sentence) matches transformers on the same weights and batch."""

import numpy as np

from jaxctx.convert import from_hf


def test_pretraining_loss_matches_bert_for_pretraining(hf, tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(3)
    model = T.BertForPreTraining(T.BertConfig(**hf.CONFIGS["bert"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg, params = from_hf(hf.save(model, tmp_path / "hf"))
    rng = np.random.default_rng(4)
    B, T_ = 4, 12
    ids = rng.integers(5, 100, (B, T_)).astype(np.int32)
    token_types = (np.arange(T_) >= 6).astype(np.int32)[None].repeat(B, 0)  # [CLS] A [SEP] | B [SEP]
    weights = (rng.random((B, T_)) < 0.3).astype(np.float32)
    weights[:, 0] = 0.0
    weights[0, 3] = 1.0  # at least one masked position
    nsp_label = np.array([0, 1, 1, 0], np.int32)
    with torch.no_grad():
        hf_labels = torch.as_tensor(np.where(weights > 0, ids, -100)).long()
        out = model(torch.as_tensor(ids).long(), token_type_ids=torch.as_tensor(token_types).long(),
                    labels=hf_labels, next_sentence_label=torch.as_tensor(nsp_label).long())
    from jaxctx.models import build
    mlm_sum, mlm_w, nsp_sum, correct = build(cfg).apply(
        {"params": params}, ids, ids, weights, nsp_label, token_type_ids=token_types, method="pretraining_loss")
    ours = float(mlm_sum / mlm_w + nsp_sum / B)
    want = float(out.loss)
    hf_correct = int((out.seq_relationship_logits.argmax(-1).numpy() == nsp_label).sum())
    print(f"BertForPreTraining loss: ours {ours:.6f}, transformers {want:.6f}, |diff| {abs(ours - want):.2e}")
    assert abs(ours - want) < 1e-4 and int(correct) == hf_correct
