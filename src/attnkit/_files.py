"""Writing files so that readers never see half of one, with the permissions ``open()`` gives.

Every file attnkit writes (checkpoints, tokenizers, corpora, reports, pictures, run logs) goes
through :func:`atomic_write`: the content is written to a temporary file beside the target and
moved into place with ``os.replace``, so a reader, or a run interrupted by Ctrl-C, sees the old
file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "user_cache_dir"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else by the
    classic set-and-restore under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """What a plain ``open(path, "w")`` would leave: an existing file keeps its mode, a new one
    gets ``0o666`` less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)``, then move the file to ``path`` in one step.

    The parent directory is created if needed. The file gets the permissions a plain ``open()``
    would give it (``mkstemp``'s private ``0o600`` would make reports and checkpoints unreadable
    to anyone else). On any exception, Ctrl-C included, the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def user_cache_dir() -> Path:
    """attnkit's per-user cache: ``$XDG_CACHE_HOME/attnkit`` (default ``~/.cache/attnkit``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attnkit"
