"""Tokenizers: the byte tokenizer, local HF tokenizer directories, the vocabulary check."""

import numpy as np
import pytest

from jaxctx.data.bpe import train_bpe
from jaxctx.data.errors import VocabSizeError
from jaxctx.data.pipeline import build_iterator
from jaxctx.data.tokenizer import ByteTokenizer, check_vocab, load_tokenizer


def test_byte_tokenizer_roundtrip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 263 <= 512
    text = "def f(x):\n    return 'héllo ✓'\n"
    (ids,) = tok.encode_batch([text])
    assert ids.dtype == np.int32 and ids.min() >= 7 and ids.max() < 263
    assert tok.decode(ids) == text
    s = tok.special
    assert (s.pad, s.bos, s.eos, s.unk, s.cls, s.sep, s.mask) == (0, 1, 2, 3, 4, 5, 6)
    assert s.separator(causal=True) == s.eos and s.separator(causal=False) == s.sep


def test_check_vocab():
    check_vocab(ByteTokenizer(), 263)
    check_vocab(1000, 1024)
    with pytest.raises(VocabSizeError, match="1030 ids but model.vocab_size=1024.*1152"):
        check_vocab(1030, 1024)


def test_trained_bpe_directory_feeds_the_pipeline(make_cfg, corpus, dh, tmp_path):
    from transformers import AutoTokenizer

    texts = dh.random_texts(80, max_len=400)
    out = str(tmp_path / "bpe")
    train_bpe(texts, 300, out)
    hf = AutoTokenizer.from_pretrained(out)
    assert len(hf) <= 300 and hf.pad_token_id == 0 and hf.mask_token_id == 6
    ids = hf(texts[0], add_special_tokens=False)["input_ids"]
    assert hf.decode(ids) == texts[0] and len(ids) < len(texts[0].encode())  # lossless and compresses
    cfg = make_cfg(source=corpus(texts), tokenizer=out, seq_len=32)
    it = build_iterator(cfg, process_index=0, process_count=1)
    batch = next(it)
    assert it.tokenizer.vocab_size == len(hf) and batch["input_ids"].max() < len(hf)
    with pytest.raises(VocabSizeError, match="model.vocab_size=256"):
        build_iterator(make_cfg(source=cfg.data.source, tokenizer=out, vocab_size=256), process_index=0,
                       process_count=1)
