"""
Reading a file that holds a secret (private key, passphrase, token): the one
place that checks its permissions.

Like OpenSSH with private keys, a file that group or others can access is
refused: the secret is already exposed, and carrying on would hide that.
The size is bounded, so that a typo such as C{/dev/zero} cannot hang the
start.  Errors name the file, never its content.

Only the standard library is used (C{gateway-ctl} has the same rules, but it
cannot import this package without Twisted, so it keeps its own copy).
"""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_FILE_BYTES", "SecretFileError", "read_secret_file"]

#: Key, token and passphrase files larger than this are refused.
MAX_FILE_BYTES = 1024 * 1024


class SecretFileError(ValueError):
    """The secret file cannot be used; C{str(error)} says why and names the file."""


def read_secret_file(path: str, what: str, limit: int = MAX_FILE_BYTES, *, regular_only: bool = False) -> bytes:
    """
    Read up to C{limit} bytes of the secret file C{path}.

    The permissions are checked on the open file (C{fstat}), so the file that
    is checked is the file that is read.

    @param what: names the file in errors (C{"key file"}).
    @param regular_only: refuse anything but a regular file (a FIFO would
        block, a device has no meaningful mode).
    @raise SecretFileError: when the file cannot be read, is open to other
        users, is too large, or (with C{regular_only}) is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SecretFileError(f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}") from None
    try:
        mode = os.fstat(fd).st_mode
        if regular_only and not stat.S_ISREG(mode):
            raise SecretFileError(f"{what} {path!r} is not a regular file")
        if stat.S_ISREG(mode) and mode & 0o077:
            raise SecretFileError(
                f"{what} {path!r} is accessible by other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise SecretFileError(f"cannot read {what} {path!r}: {e.strerror or type(e).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise SecretFileError(f"{what} {path!r} is larger than {limit} bytes")
    return data
