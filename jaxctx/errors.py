"""The user-facing error hierarchy: problems a user can fix, as opposed to bugs in jaxctx.

Every entry point (`python train.py`, each `jaxctx` subcommand) catches `UserError` and prints its message as one
line, `PROG: error: MESSAGE`, then exits with code 2 (see `report_user_error`). Anything else is a bug and keeps
its traceback, so it can be reported. A message names the file, key, shape or value that is wrong and what would
be right (`data.seq_len=100 must be divisible by 8`, not `invalid value`).

Each class also subclasses the builtin a caller would naturally catch (`ValueError`, `FileNotFoundError`,
`OSError`), so library users need not import this module. The families:

    UserError
    ├── ConfigError        a config key or value (jaxctx.config)
    ├── UsageError         a command-line flag value (bench sizes, --out paths, ...)
    ├── DataError          a corpus, tokenizer or data setting (jaxctx.data.errors subclasses it)
    ├── CheckpointError    a checkpoint that does not exist, does not restore, or does not fit the model
    ├── ConvertError       a model that cannot be converted (jaxctx.convert.errors subclasses it)
    ├── PlatformError      a kernel or setting this machine's backend cannot run (cudnn on a CPU)
    ├── WorkdirError       a workdir that cannot be used, or that was made for another model
    └── WriteError         a file could not be written (disk full, permissions); what was there is intact
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem with the user's input or environment; entry points print it as one line and exit 2."""


class ConfigError(UserError, ValueError):
    """A config value or key is invalid; the message names the key and what would be valid."""


class UsageError(UserError, ValueError):
    """A command-line flag has a bad value; the message names the flag and an example of a good one."""


class DataError(UserError, ValueError):
    """Bad data or a bad data setting (empty dataset, missing field, bad format, unusable tokenizer, ...)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not match the model; the message names the path and step."""


class ConvertError(UserError, ValueError):
    """A model, config or directory cannot be converted (the message says which and why)."""


class PlatformError(UserError, ValueError):
    """The configured kernel or setting needs hardware or software this machine does not have."""


class WorkdirError(UserError, ValueError):
    """The workdir cannot be used: it is a file, unwritable, or holds a run of a different model or data."""


class WriteError(UserError, OSError):
    """Writing a checkpoint, metrics or config file failed (e.g. disk full); earlier files are left intact."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (newlines inside messages from other libraries folded into ' | ')."""
    text = str(err).strip() or type(err).__name__
    return " | ".join(part.strip() for part in text.splitlines() if part.strip())


def report_user_error(prog: str, err: BaseException) -> int:
    """Print `prog: error: MESSAGE` on stderr and return the exit code for user errors (2)."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return 2
