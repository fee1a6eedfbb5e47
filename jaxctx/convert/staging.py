"""`jaxctx convert from-hf / to-hf` on `gs://` (any URL jaxctx.storage knows): staged through a local temp dir.

The conversion itself stays local (safetensors, Orbax and the tokenizer libraries want files): a URL input is
downloaded into a temporary directory first (only what the conversion reads: an HF directory's top-level files,
a workdir's small files and ONE checkpoint step's params and meta, never its optimizer state or other steps), and
a URL output is built locally, then uploaded. The never-overwrite rule holds: a non-empty output prefix is refused
before anything is read unless force. GCS has no directory rename, so the upload is object by object; the files a
reader recognises the result by go last (config.json of an HF export, config.yaml and the checkpoint's
commit markers of an import), so an interrupted upload does not look like a complete model.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

from jaxctx import storage
from jaxctx.convert import io
from jaxctx.convert.errors import ConvertError, OutputExistsError

# Written last: what marks a complete HF directory / a complete Orbax step / a from-hf checkpoint.
_LAST = ("commit_success.txt", "_CHECKPOINT_METADATA", io.CONFIG_FILE, "config.yaml")
_STEP = re.compile(r"^\d+$")


def involves_url(*paths) -> bool:
    return any(p is not None and storage.is_url(p) for p in paths)


def check_output(out_dir: str, *, force: bool, sources: tuple[str, ...]) -> None:
    """The checks of io.output_dir for a URL: not one of the inputs, and empty (or force)."""
    out = storage.absolute(out_dir)
    for src in sources:
        src = storage.absolute(src)
        if out == src or src.startswith(out + "/"):
            raise ConvertError(f"output directory {out} would replace the input {src}; choose another OUT_DIR")
    if storage.isfile(out):
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if storage.listdir(out) and not force:
        raise OutputExistsError(f"output directory {out} exists and is not empty; pass --force (force=True) to "
                                f"replace it")


def upload(local_dir: str, out_dir: str) -> None:
    """Upload a finished local output to the URL out_dir; the marker files last, then (force) stale objects go."""
    stale = set(storage.files_under(out_dir))
    files = storage.files_under(local_dir)
    ordered = sorted(files, key=lambda rel: (rel.rsplit("/", 1)[-1] in _LAST, rel.count("/") == 0, rel))
    storage.copy_files(local_dir, out_dir, ordered)
    for rel in sorted(stale - set(files)):
        storage.remove(storage.join(out_dir, *rel.split("/")))


def stage_hf_dir(hf_dir: str, tmp: str) -> str:
    """Download an HF directory's top-level files (pickle weights only if no safetensors are there)."""
    url = storage.absolute(hf_dir)
    if not storage.isdir(url):
        from jaxctx.convert.errors import HFFileNotFoundError
        raise HFFileNotFoundError(f"{url} does not exist or is not a directory")
    names = [n for n in storage.listdir(url) if storage.isfile(storage.join(url, n))]
    if any(n.endswith(".safetensors") for n in names):
        names = [n for n in names if not n.endswith(io.PICKLE_SUFFIXES + (".h5", ".msgpack"))]
    local = os.path.join(tmp, "source", storage.basename(url))
    storage.copy_files(url, local, names)
    os.makedirs(local, exist_ok=True)
    return local


def stage_checkpoint(src: str, step: int | None, tmp: str) -> str:
    """Download what `to-hf` reads of a workdir or checkpoint root: the workdir's top-level files and hf_files/,
    and the params and meta of one step (`step`, or the newest one that Orbax marked complete)."""
    from jaxctx.checkpoint import checkpoint_dir

    src = storage.absolute(src)
    root = checkpoint_dir(src)  # UserFileNotFoundError if src does not exist
    local = os.path.join(tmp, "source", storage.basename(src))
    local_root = local if root == src else os.path.join(local, "checkpoints")
    for directory, target in ((src, local), (root, local_root)):
        files = [n for n in storage.listdir(directory) if storage.isfile(storage.join(directory, n))]
        storage.copy_files(directory, target, files)
        hf_files = storage.join(directory, "hf_files")
        storage.copy_files(hf_files, os.path.join(target, "hf_files"), storage.files_under(hf_files))
    steps = sorted((int(n) for n in storage.listdir(root) if _STEP.match(n)), reverse=True)
    if step is None:
        complete = [s for s in steps if storage.exists(storage.join(root, str(s), "commit_success.txt"))]
        chosen = (complete or steps or [None])[0]
    else:
        if step not in steps:
            raise ConvertError(f"{root} has no checkpoint step {step}; it has steps "
                               f"{', '.join(map(str, sorted(steps))) or 'none'}")
        chosen = step
    if chosen is None:
        raise ConvertError(f"no checkpoint in {root} (it holds: {', '.join(storage.listdir(root)[:8]) or 'nothing'})")
    step_url = storage.join(root, str(chosen))
    wanted = [rel for rel in storage.files_under(step_url) if not rel.startswith("opt_state/")]
    storage.copy_files(step_url, os.path.join(local_root, str(chosen)), wanted)
    return local


@contextlib.contextmanager
def local_output(out_dir: str, tmp: str, *, force: bool, sources: tuple[str, ...]):
    """Yield the local path to build `out_dir` in: out_dir itself, or (a URL, checked first) a temporary one that
    is uploaded when the block completes."""
    if not storage.is_url(out_dir):
        yield out_dir
        return
    check_output(out_dir, force=force, sources=sources)
    local = os.path.join(tmp, "out", storage.basename(out_dir))
    yield local
    upload(local, storage.absolute(out_dir))


def temp_dir():
    """A local staging directory, removed afterwards."""
    return tempfile.TemporaryDirectory(prefix="jaxctx-convert-")
