"""Tokenizer files of an export: the built-in byte tokenizer written as a Hugging Face tokenizer, and the special
token ids of any tokenizer directory (for config.json / generation_config.json).

The byte tokenizer (`jaxctx.data.tokenizer.ByteTokenizer`: ids 0..6 the specials `<pad> <bos> <eos> <unk> <cls>
<sep> <mask>`, id 7 + b the byte b) becomes a `tokenizers` byte-level BPE with no merges:

- the ByteLevel pre-tokenizer (GPT-2's) maps each UTF-8 byte to one printable character, without a regex split and
  without an added prefix space, so every byte is one piece;
- the vocabulary is the 7 specials, then the 256 byte characters at ids 7 + b; with no merges every piece is its
  own token, so encoding gives exactly the jaxctx ids;
- the ByteLevel decoder maps the characters back to bytes and decodes UTF-8 with U+FFFD for invalid sequences,
  as `ByteTokenizer.decode` does (errors="replace").

Only `tokenizers` is needed (no transformers); tokenizer_config.json and special_tokens_map.json are written by
hand in the form `AutoTokenizer` reads (class PreTrainedTokenizerFast, which transformers 4.x and 5.x both load).
One difference is deliberate: transformers matches special tokens written in the text (`"<mask>"` -> id 6, which
the fill-mask pipeline needs), where ByteTokenizer encodes them as bytes; `AutoTokenizer.from_pretrained(dir,
split_special_tokens=True)` gives ByteTokenizer's behaviour exactly.
"""

from __future__ import annotations

import json
import os

from jaxctx.convert.errors import ConvertError
from jaxctx.data.tokenizer import SPECIAL_NAMES, SPECIAL_TOKENS, ByteTokenizer

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # the ids config.json and generation use


def _byte_chars() -> dict[int, str]:
    """Byte -> the printable character GPT-2's byte-level BPE uses for it (the ByteLevel pre-tokenizer's table).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen) are
    shifted to U+0100 onwards in byte order, so no piece is whitespace or invisible.
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


def write_byte_tokenizer(out_dir: str, model_max_length: int) -> list[str]:
    """Write the byte tokenizer as tokenizer.json + tokenizer_config.json + special_tokens_map.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = _byte_chars()
    if set(chars.values()) != set(pre_tokenizers.ByteLevel.alphabet()):  # the table is the library's own
        raise AssertionError("byte table differs from tokenizers' ByteLevel alphabet")
    offset = ByteTokenizer.offset
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({chars[b]: b + offset for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # normalized=False: matched on the raw text; special=True: skip_special_tokens drops them, as decode does.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {f"{name}_token": token for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False,  # no space removal before punctuation: lossless decode
              "add_bos_token": False, "add_eos_token": False, **specials}  # jaxctx adds no specials on encode
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), specials)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


Template = list  # pieces of a TemplateProcessing template: "$A:0" / "$B:1", or (special token id, type id)


def task_templates(task: str, causal: bool, special) -> tuple[Template, Template] | None:
    """The (single, pair) templates of the special tokens jaxctx's task encoding adds (jaxctx.data.task_encode);
    None for a language model (its export keeps the tokenizer's own behaviour).

        sequence_classification  bert: [CLS] A [SEP] (B [SEP], type 1)   gpt2/llama: A (SEP B) EOS, all type 0
        token_classification     bert: [CLS] A [SEP]                     gpt2/llama: A (nothing added)
    """
    from jaxctx.data.task_encode import Specials

    if task == "lm":
        return None
    if causal and task == "token_classification":
        return ["$A:0"], ["$A:0", "$B:0"]
    s = Specials(causal=causal, cls=special.cls, sep=special.separator(False), eos=special.separator(True))
    if causal:
        return ["$A:0", (s.eos, 0)], ["$A:0", (s.sep, 0), "$B:0", (s.eos, 0)]
    if s.cls is None:
        raise ConvertError("a bert task model reads [CLS], but its tokenizer has no cls token")
    single = [(s.cls, 0), "$A:0", (s.sep, 0)]
    return single, single + ["$B:1", (s.sep, 1)]


def add_task_template(out_dir: str, task: str, causal: bool, tokenizer: str) -> bool:
    """Make out_dir/tokenizer.json add the special tokens a task model was fine-tuned with, so transformers'
    text-/token-classification pipelines feed the model what `jaxctx predict` feeds it (the byte tokenizer and
    `jaxctx tokenizer train` BPEs otherwise add none). A post-processor the tokenizer already has (e.g. ByteLevel
    offset trimming) runs first. Returns False where there is nothing to change (a language model, or a
    directory without tokenizer.json)."""
    from tokenizers import Tokenizer, processors

    from jaxctx.data.tokenizer import load_tokenizer

    path = os.path.join(out_dir, "tokenizer.json")
    if task == "lm" or not os.path.isfile(path):  # a language model keeps its tokenizer exactly as it came
        return False
    templates = task_templates(task, causal, load_tokenizer(tokenizer).special)
    tok = Tokenizer.from_file(path)
    names = {p[0]: tok.id_to_token(p[0]) for t in templates for p in t if isinstance(p, tuple)}
    missing = sorted(i for i, name in names.items() if name is None)
    if missing:
        raise ConvertError(f"{path}: special token id(s) {missing} of the task encoding are not in its vocabulary")
    single, pair = (" ".join(p if isinstance(p, str) else f"{names[p[0]]}:{p[1]}" for p in t) for t in templates)
    template = processors.TemplateProcessing(single=single, pair=pair,
                                             special_tokens=[(name, i) for i, name in names.items()])
    existing = tok.post_processor
    tok.post_processor = template if existing is None else processors.Sequence([existing, template])
    tok.save(path)
    if not causal:  # BERT pairs: the tokenizer must return the token types, or transformers feeds zeros
        config_path = os.path.join(out_dir, "tokenizer_config.json")
        config = _read_json(config_path)
        config = config if isinstance(config, dict) else {"tokenizer_class": "PreTrainedTokenizerFast"}
        config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        _write_json(config_path, config)
    return True


def byte_token_ids() -> dict[str, int]:
    special = ByteTokenizer().special
    return {"bos_token_id": special.bos, "eos_token_id": special.eos, "pad_token_id": special.pad}


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _vocab(directory: str) -> dict[str, int]:
    """Token string -> id from whichever vocabulary files the directory has ({} if none is readable)."""
    vocab: dict[str, int] = {}
    tok = _read_json(os.path.join(directory, "tokenizer.json"))
    if isinstance(tok, dict):
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE, WordPiece, WordLevel
            vocab.update({k: v for k, v in model_vocab.items() if isinstance(v, int)})
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...] in id order
            vocab.update({entry[0]: i for i, entry in enumerate(model_vocab) if isinstance(entry, list) and entry})
        for added in tok.get("added_tokens") or []:
            if isinstance(added, dict) and isinstance(added.get("id"), int):
                vocab[added.get("content")] = added["id"]
    elif os.path.isfile(os.path.join(directory, "vocab.txt")):  # a WordPiece vocab without tokenizer.json
        with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
            vocab.update({line.rstrip("\n"): i for i, line in enumerate(f)})
    elif isinstance(plain := _read_json(os.path.join(directory, "vocab.json")), dict):
        vocab.update({k: v for k, v in plain.items() if isinstance(v, int)})
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    decoder = config.get("added_tokens_decoder") if isinstance(config, dict) else None
    if isinstance(decoder, dict):
        for key, added in decoder.items():
            if isinstance(added, dict) and str(key).isdigit():
                vocab[added.get("content")] = int(key)
    return vocab


def _special_strings(directory: str) -> dict[str, str]:
    """{"bos": "<s>", ...} from special_tokens_map.json and tokenizer_config.json, the latter winning (it is what
    transformers 5 reads); values are strings or AddedToken dicts."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        values = _read_json(os.path.join(directory, name))
        if not isinstance(values, dict):
            continue
        for key in ("bos", "eos", "pad"):
            value = values.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def token_ids(directory: str) -> dict[str, int]:
    """The bos/eos/pad ids a tokenizer directory defines ({"eos_token_id": 2, ...}; absent where it has none)."""
    vocab = _vocab(directory)
    return {f"{key}_token_id": vocab[token] for key, token in _special_strings(directory).items() if token in vocab}


def vocab_size(directory: str) -> int | None:
    """Number of ids of a tokenizer directory (largest id + 1), None if its files do not say."""
    vocab = _vocab(directory)
    return max(vocab.values()) + 1 if vocab else None


def check_fits(tokenizer: str, model_vocab_size: int) -> None:
    """A tokenizer with more ids than the model's embedding rows is the wrong tokenizer for this model."""
    size = ByteTokenizer().vocab_size if tokenizer == "byte" else vocab_size(tokenizer)
    if size is not None and size > model_vocab_size:
        raise ConvertError(f"tokenizer {tokenizer} has {size} ids but the model has model.vocab_size="
                           f"{model_vocab_size}; it is not the tokenizer this model was trained with")
