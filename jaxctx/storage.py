"""Local paths and `gs://` URLs behind one small interface: what a workdir, a checkpoint or a conversion touches.

Every file of a workdir (config records, metrics.jsonl, the checkpoint directory listing, conversion inputs and
outputs) goes through these functions, never through a bare `open()` / `os.path`: a local path keeps the POSIX
calls (fsync, atomic `os.replace`), a URL (`gs://bucket/run`, or any scheme etils.epath knows) goes through
`etils.epath`, which reaches GCS through gcsfs. Arrays are not written here: Orbax writes checkpoints to the same
URLs through TensorStore.

Atomic writes keep the local guarantee on GCS: locally the text goes to a temporary file that is renamed into
place; on GCS a single object upload is itself atomic (a reader sees the old object or the whole new one), so the
object is uploaded in one request. A GCS object is immutable, so an append re-uploads the whole object.

Tests point GCS at a local emulator: `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage) and
`TENSORSTORE_GCS_HTTP_URL` (TensorStore).
"""

from __future__ import annotations

import os
import re
import shutil

from jaxctx.errors import WriteError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# A TensorStore transfer slower than this many bytes/s for this many seconds is aborted and retried instead of
# hanging a checkpoint save or restore on a stalled GCS connection (TensorStore's own default waits forever).
CURL_LOW_SPEED_DEFAULTS = {"TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS": "60",
                           "TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES": "1024"}


def is_url(path) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return bool(_URL.match(os.fspath(path)))


def set_tensorstore_timeouts() -> None:
    """Give TensorStore's curl the low-speed limits of CURL_LOW_SPEED_DEFAULTS unless the user set them."""
    for key, value in CURL_LOW_SPEED_DEFAULTS.items():
        os.environ.setdefault(key, value)


_FSSPEC_CONFIGURED = False


def _epath(path):
    global _FSSPEC_CONFIGURED
    if not _FSSPEC_CONFIGURED:
        # No cached listings: checkpoints are written by TensorStore and by other processes, which gcsfs's listing
        # cache would not see (a resume would miss the newest step).
        import fsspec.config
        for protocol in ("gs", "gcs"):
            fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
        _FSSPEC_CONFIGURED = True
    from etils import epath
    return epath.Path(os.fspath(path))


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def absolute(path) -> str:
    """An absolute local path, or the URL as given (without a trailing slash)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def basename(path) -> str:
    path = os.fspath(path).rstrip("/")
    return path.rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def parent(path) -> str:
    path = os.fspath(path).rstrip("/")
    return path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(path)


def exists(path) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_url(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path) -> list[str]:
    """Names in a directory (a GCS "directory" is a prefix); [] if it does not exist."""
    if is_url(path):
        p = _epath(path)
        return sorted(child.name for child in p.iterdir()) if p.is_dir() else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path) -> None:
    if is_url(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path) -> str:
    """The file's text (UTF-8, undecodable bytes replaced); OSError (FileNotFoundError) if it cannot be read."""
    return read_bytes(path).decode("utf-8", errors="replace")


def read_bytes(path) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path, data: str | bytes) -> None:
    """Write `data` to a temporary file/object beside `path`, then move it into place (a crash leaves the old one).

    A failure is a WriteError naming the file; the previous content is unchanged.
    """
    path = os.fspath(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if is_url(path):
            # One object upload is already atomic on GCS (readers see the old object or the whole new one, never
            # a part), so no temporary object: a rename there is a server-side copy plus a delete.
            _epath(path).write_bytes(raw)
        else:
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as err:
        try:
            remove(tmp)
        except OSError:
            pass
        raise WriteError(f"could not write {path}: {err}; the previous file is unchanged") from None


def append_text(path, text: str) -> None:
    """Append to a text file (GCS: the object is rewritten atomically with the text added). OSError on failure."""
    path = os.fspath(path)
    if is_url(path):
        before = read_bytes(path) if exists(path) else b""
        write_atomic(path, before + text.encode("utf-8"))
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


def remove(path) -> None:
    if is_url(path):
        _epath(path).unlink(missing_ok=True)
    elif os.path.exists(path):
        os.remove(path)


def move_tree(src, dst) -> None:
    """Move a file or directory (GCS: copy every object under the prefix, then delete the originals)."""
    if is_url(src) or is_url(dst):
        source, target = _epath(src), _epath(dst)
        for rel in files_under(src):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).copy(target / rel, overwrite=False)
        source.rmtree()
    else:
        shutil.move(src, dst)


def copy_file(src, dst) -> None:
    """Copy one file between any two places (local <-> gs://), overwriting `dst`."""
    if is_url(src) or is_url(dst):
        _epath(dst).write_bytes(read_bytes(src))
    else:
        shutil.copyfile(src, dst)


def files_under(path) -> list[str]:
    """Relative paths ("a/b.json", "/"-separated) of every file under a directory (a GCS prefix); [] if none."""
    if is_url(path):
        root = _epath(path)
        if not root.is_dir():
            return []
        walk = list(root.walk())  # top-down: the first entry is root itself (its dirpath spelled without gs://)
        base = len(os.fspath(walk[0][0]).rstrip("/")) + 1
        return sorted((os.fspath(dirpath) + "/")[base:] + name for dirpath, _, names in walk for name in names)
    found = [os.path.join(dirpath, name) for dirpath, _, names in os.walk(path) for name in names]
    return sorted(os.path.relpath(f, path).replace(os.sep, "/") for f in found)


def copy_files(src, dst, relative_paths) -> None:
    """Copy the files `relative_paths` ("/"-separated) from directory `src` to directory `dst`, in the given
    order (either side may be a URL); parent directories are made as needed, existing files overwritten."""
    for rel in relative_paths:
        target = join(dst, *rel.split("/"))
        if not is_url(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        copy_file(join(src, *rel.split("/")), target)
