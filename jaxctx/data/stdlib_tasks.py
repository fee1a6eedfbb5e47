"""Two labelled tasks made offline from the Python standard library's sources (`jaxctx data make-task NAME`).

stdlib-package (classification)
    One example per source file of 11 stdlib packages (FAMILIES); the label is the package. The text is the
    whole file with every family name and alias masked as `<pkg>` wherever it occurs, case-insensitively and
    inside longer words too (`_asynciomodule.c`, `email.mime`, `xmlrpc`), and no path, so the label must be
    inferred from the code. Large families are capped at MAX_FILES_PER_FAMILY files (chosen by hash) to
    keep the classes within 5x of each other. Files are long (median ~10 KB): the task rewards context.
stdlib-tokens (tagging)
    Source files cut into chunks of at least CHUNK_LINES lines (at logical-line ends, so no token is split); the
    words are the whitespace-separated pieces of each Python token (from the `tokenize` module) and each word is
    tagged with its token's class, BIO over the words of one token: keyword, builtin, name, number, string,
    comment, operator (O for anything else, such as an error token). A comment of four words is B-comment
    I-comment I-comment I-comment, so entity-level F1 (seqeval) scores whole tokens.

Splits are deterministic: a file goes to validation iff it is among the first VALIDATION_SHARE of its family
(package) or of the chosen files (tokens) when sorted by a hash of its path. Both write train.jsonl,
validation.jsonl and task.json (labels and counts) into --out.
"""

from __future__ import annotations

import builtins
import io
import json
import keyword
import os
import re
import shutil
import tempfile
import tokenize

from jaxctx.data.errors import DataError
from jaxctx.data.sources import hash_fraction, stdlib_files

FAMILIES = ("asyncio", "ctypes", "distutils", "email", "idlelib", "importlib", "lib2to3", "multiprocessing",
            "tkinter", "unittest", "xml")
ALIASES = {"idlelib": ("idle",), "lib2to3": ("2to3",)}  # near-names that would give the label away
MASK = "<pkg>"
MAX_FILES_PER_FAMILY = 40
VALIDATION_SHARE = 0.2
TOKEN_FILES = 60  # stdlib-tokens: files used (chosen by hash)
CHUNK_LINES = 3  # median chunk ~100 bytes: 2-3 per 256-token row, ~6% longer than 256 bytes
TOKEN_CLASSES = ("keyword", "builtin", "name", "number", "string", "comment", "operator")
MULTI_WORD = ("string", "comment")  # the only classes whose tokens can hold whitespace, so the only I- tags
TAGS = ("O",) + tuple(f"B-{c}" for c in TOKEN_CLASSES) + tuple(f"I-{c}" for c in MULTI_WORD)
TASKS = ("stdlib-package", "stdlib-tokens")

_NAMES = sorted({n for f in FAMILIES for n in (f,) + ALIASES.get(f, ())}, key=len, reverse=True)
MASK_PATTERN = re.compile("|".join(map(re.escape, _NAMES)), re.I)
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_"))


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def mask_names(text: str) -> str:
    """Replace every package family name and alias with MASK (see the module docstring)."""
    return MASK_PATTERN.sub(MASK, text)


def _split(keys: list[str]) -> set[str]:
    """The validation keys: the first VALIDATION_SHARE (at least one) by hash."""
    ranked = sorted(keys, key=hash_fraction)
    return set(ranked[: max(1, round(len(ranked) * VALIDATION_SHARE))])


def package_examples() -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...]} rows {"text", "label"} of stdlib-package."""
    root, files = stdlib_files()
    by_family: dict[str, list[str]] = {f: [] for f in FAMILIES}
    for path in files:
        parts = os.path.relpath(path, root).split(os.sep)
        if len(parts) > 1 and parts[0] in by_family:
            by_family[parts[0]].append(os.path.relpath(path, root))
    out = {"train": [], "validation": []}
    for family, rels in by_family.items():
        rels = sorted(rels, key=hash_fraction)[:MAX_FILES_PER_FAMILY]
        held = _split(rels)
        for rel in sorted(rels):
            text = mask_names(_read(os.path.join(root, rel)))
            if text.strip():
                out["validation" if rel in held else "train"].append({"text": text, "label": family})
    return out


def token_class(tok: tokenize.TokenInfo) -> str | None:
    """The class of one Python token, or None for layout tokens (NEWLINE, INDENT, ...)."""
    name = tokenize.tok_name[tok.exact_type if tok.type == tokenize.OP else tok.type]
    if tok.type == tokenize.NAME:
        if keyword.iskeyword(tok.string):
            return "keyword"
        return "builtin" if tok.string in _BUILTINS else "name"
    if tok.type == tokenize.NUMBER:
        return "number"
    if tok.type == tokenize.STRING or name.startswith("FSTRING"):
        return "string"
    if tok.type == tokenize.COMMENT:
        return "comment"
    if tok.type == tokenize.OP:
        return "operator"
    if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
        return "O"
    return None


def tag_source(source: str) -> list[tuple[list[str], list[str]]]:
    """Chunks of a source file as (words, BIO tags); chunks end at a logical line after CHUNK_LINES lines."""
    chunks, words, tags, first_line = [], [], [], 1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        cls = token_class(tok)
        if cls is not None:
            for k, piece in enumerate(tok.string.split()):
                words.append(piece)
                tags.append("O" if cls == "O" else f"{'I' if k else 'B'}-{cls}")
        if tok.type == tokenize.NEWLINE and tok.end[0] - first_line + 1 >= CHUNK_LINES and words:
            chunks.append((words, tags))
            words, tags, first_line = [], [], tok.end[0] + 1
    if words:
        chunks.append((words, tags))
    return chunks


def token_examples() -> dict[str, list[dict]]:
    """{"train": [...], "validation": [...]} rows {"tokens", "tags"} of stdlib-tokens."""
    root, files = stdlib_files()
    rels = sorted((os.path.relpath(p, root) for p in files), key=hash_fraction)[:TOKEN_FILES]
    held = _split(rels)
    out = {"train": [], "validation": []}
    for rel in sorted(rels):
        try:
            chunks = tag_source(_read(os.path.join(root, rel)))
        except (tokenize.TokenError, SyntaxError, IndentationError):  # a file tokenize cannot read: skip it
            continue
        out["validation" if rel in held else "train"].extend({"tokens": w, "tags": t} for w, t in chunks)
    return out


def make_task(name: str, out_dir: str, *, force: bool = False) -> dict:
    """Write task `name` as JSONL into `out_dir`; returns the summary written to task.json."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if os.path.isfile(out_dir) or (os.path.isdir(out_dir) and os.listdir(out_dir) and not force):
        raise DataError(f"--out {out_dir} exists and is not an empty directory; pass --force to write into it")
    splits = package_examples() if name == "stdlib-package" else token_examples()
    if name == "stdlib-package":
        labels = list(FAMILIES)
        counts = {s: {f: sum(r["label"] == f for r in rows) for f in FAMILIES} for s, rows in splits.items()}
    else:
        labels = list(TAGS)
        counts = {s: {"examples": len(rows), "words": sum(len(r["tokens"]) for r in rows)}
                  for s, rows in splits.items()}
    summary = {"task": name, "labels": labels, "counts": counts,
               "format": "text + label" if name == "stdlib-package" else "tokens + tags (BIO)"}
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".make-task-", dir=out_dir)  # write beside, then move each file into place
    try:
        for split, rows in splits.items():
            with open(os.path.join(tmp, f"{split}.jsonl"), "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(os.path.join(tmp, "task.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        for file in ("train.jsonl", "validation.jsonl", "task.json"):
            os.replace(os.path.join(tmp, file), os.path.join(out_dir, file))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
