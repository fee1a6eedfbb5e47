"""Hugging Face model directories on disk: config.json, safetensors (single or sharded), tokenizer files.

Reading:
- `read_hf_config(dir)` -> the parsed config.json.
- `open_tensors(dir)` -> a `TensorSource`: names, shapes and dtypes from the safetensors headers (nothing loaded),
  and `load(name)` reading one tensor (memory-mapped) as numpy. `model.safetensors.index.json` (sharded) wins over
  `model.safetensors`. Only safetensors are ever read: a directory with nothing but PyTorch pickles
  (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) is refused with a message on how to convert it; pickles are never opened.

Writing:
- `output_dir(out_dir, force)`: a context manager yielding a fresh temporary directory beside OUT_DIR, moved into
  place only when the block finishes, so a failure never leaves a half-written OUT_DIR. A non-empty OUT_DIR is
  refused unless force.
- `write_tensors(dir, tensors, shard_size)`: `model.safetensors`, or `model-0000k-of-0000n.safetensors` plus
  `model.safetensors.index.json` when the total exceeds shard_size (the layout `save_pretrained` writes).
- `copy_side_files(src, dst)`: tokenizer files (and generation_config.json) carried along.

Dtypes: f32, bf16 and f16 (f64 read too) via numpy + ml_dtypes; `cast` converts with round-to-nearest-even like
torch, and values that came from a 16-bit file convert back to it bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxctx.convert.errors import (ConvertError, HFFileNotFoundError, OutputExistsError, PickleCheckpointError)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files copied along with the weights, both directions (tokenizers of every HF flavour, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
              "chat_template.jinja", "chat_template.json", "generation_config.json")
TOKENIZER_FILES = tuple(name for name in SIDE_FILES if name != "generation_config.json")

DTYPES = {  # our name -> (numpy dtype, safetensors header name)
    "float32": (np.dtype(np.float32), "F32"),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
    "float16": (np.dtype(np.float16), "F16"),
}
FLOAT_HEADER_DTYPES = {"F32", "BF16", "F16", "F64"}


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------

def read_hf_config(hf_dir: str) -> dict:
    """config.json of a Hugging Face model directory, parsed."""
    if not os.path.isdir(hf_dir):
        raise HFFileNotFoundError(f"Hugging Face model directory {hf_dir} does not exist")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFFileNotFoundError(f"{path} is missing: a Hugging Face model directory needs config.json (written by "
                                  f"save_pretrained) next to its safetensors weights")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors header name: F32, BF16, F16, ...
    file: str


class TensorSource:
    """The tensors of a safetensors directory: headers read eagerly, data read (memory-mapped) on `load`."""

    def __init__(self, infos: dict[str, TensorInfo], description: str):
        self.infos = infos
        self.description = description  # e.g. "/x/model.safetensors" or "/x (3 shards)", for messages

    def names(self) -> list[str]:
        return list(self.infos)

    def load(self, name: str) -> np.ndarray:
        """One tensor as a numpy array in its stored dtype."""
        with safe_open(self.infos[name].file, framework="numpy") as f:
            return f.get_tensor(name)

    def load_float32(self, name: str) -> np.ndarray:
        """One tensor as float32 (exact for f32/bf16/f16 files)."""
        return np.asarray(self.load(name), dtype=np.float32)


def _read_header(path: str) -> dict[str, TensorInfo]:
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: TensorInfo(tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype(), path)
                    for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for truncated or corrupt headers
        raise ConvertError(f"{path} is not a readable safetensors file: {err}") from None


def find_pickles(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(PICKLE_SUFFIXES))


def open_tensors(hf_dir: str) -> TensorSource:
    """The weights of a HF directory: sharded (index.json) or single model.safetensors; pickles refused."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single_path = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
        return _open_sharded(hf_dir, index_path)
    if os.path.isfile(single_path):
        return TensorSource(_read_header(single_path), single_path)
    pickles = find_pickles(hf_dir)
    if pickles:
        raise PickleCheckpointError(
            f"{hf_dir} holds only PyTorch pickle weights ({', '.join(pickles)}); jaxctx reads safetensors only and "
            f"never unpickles (a pickle can run arbitrary code). If you trust the file, convert it once with "
            f"transformers, which loads it with torch.load(weights_only=True) and writes safetensors: python -c "
            f"\"import transformers as t; t.AutoModelForCausalLM.from_pretrained('{hf_dir}').save_pretrained("
            f"'{hf_dir.rstrip(os.sep)}-safetensors')\" (AutoModelForMaskedLM for BERT)")
    raise HFFileNotFoundError(f"{hf_dir} has no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def _open_sharded(hf_dir: str, index_path: str) -> TensorSource:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConvertError(f"{index_path} is not a safetensors index (needs a \"weight_map\" object): {err}") from None
    infos: dict[str, TensorInfo] = {}
    problems = []
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(hf_dir, shard)
        if os.path.basename(shard) != shard:
            raise ConvertError(f"{index_path}: shard name {shard!r} must be a file name inside {hf_dir}")
        if not os.path.isfile(path):
            raise HFFileNotFoundError(f"{path} is missing but {index_path} maps tensors to it")
        header = _read_header(path)
        wanted = {name for name, file in weight_map.items() if file == shard}
        problems += [f"{name} (listed in the index, absent from {shard})" for name in sorted(wanted - set(header))]
        problems += [f"{name} (in {shard}, absent from the index)" for name in sorted(set(header) - wanted)]
        infos.update({name: info for name, info in header.items() if name in wanted})
    if problems:
        raise ConvertError(f"{index_path} does not match its shards: {'; '.join(problems)}")
    return TensorSource(infos, f"{hf_dir} ({len(set(weight_map.values()))} shards)")


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (the units transformers uses)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ConvertError(f"shard size {text!r} must look like 5GB, 500MB, 2GiB or a number of bytes")
        number, unit = float(match.group(1)), (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        size = int(number * base ** "BKMGT".index(unit[0]))
    if size <= 0:
        raise ConvertError(f"shard size {text!r} must be positive")
    return size


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the export dtype (float32 | bfloat16 | float16), round to nearest even."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).astype(DTYPES[dtype][0]))


def write_tensors(out_dir: str, tensors: dict[str, np.ndarray], shard_size: int) -> list[str]:
    """Write tensors (in the given order) as one file, or as shards + index when larger than shard_size bytes.

    A shard is closed before the tensor that would take it past shard_size; a single tensor larger than
    shard_size gets a shard of its own (as transformers does). Returns the written file names.
    """
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers expects it on safetensors checkpoints
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, file_name), metadata=metadata)
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
    write_json(os.path.join(out_dir, INDEX_FILE), index)
    return names + [INDEX_FILE]


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def copy_side_files(src_dir: str | None, dst_dir: str, names=SIDE_FILES) -> list[str]:
    """Copy the tokenizer (and generation config) files present in src_dir; returns the copied names."""
    if not src_dir or not os.path.isdir(src_dir):
        return []
    copied = []
    for name in names:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def has_tokenizer_files(directory: str | None) -> bool:
    return bool(directory) and os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


@contextlib.contextmanager
def output_dir(out_dir: str, *, force: bool = False, sources: tuple[str, ...] = ()):
    """Yield a temporary directory that becomes out_dir when the block completes (removed on any error).

    out_dir must not exist, be an empty directory, or (with force) a directory that is replaced. It may not be one
    of `sources` (the input being converted), which replacing would destroy.
    """
    out_dir = os.path.abspath(out_dir)
    for src in sources:
        src = os.path.abspath(src)
        if out_dir == src or src.startswith(out_dir + os.sep):
            raise ConvertError(f"output directory {out_dir} would replace the input {src}; choose another OUT_DIR")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir):
            raise OutputExistsError(f"output path {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not force:
            raise OutputExistsError(f"output directory {out_dir} exists and is not empty; pass --force (force=True) "
                                    f"to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp (and safetensors' own temp files) are private (0700/0600); give the result the usual permissions.
        for dirpath, _, filenames in os.walk(tmp):
            os.chmod(dirpath, 0o777 & ~umask)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~umask)
        if os.path.lexists(out_dir):
            # Swap: move the old directory aside, the new one in, then delete the old one.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
