"""Fetching Debian packages and indexes without installing anything and without root.

``apt-get download`` and ``apt-get update`` run against a private state directory under the
data cache (``Dir::State::Lists``, ``Dir::Cache``), so the system's package lists and dpkg
database are never touched. Archives are unpacked with ``dpkg-deb -x``.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["DataError", "apt_update", "download_and_unpack", "fingerprint", "read_index", "release_indexes"]

# index files of suites that move between point releases: a corpus built from them drifts
_MOVING = re.compile(r"(?:^|[-_.])(?:updates|security|backports|proposed-updates)[-_]")


class DataError(RuntimeError):
    """A corpus could not be fetched or built; the message says why and what to do."""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DataError(
            f"'{name}' was not found on PATH: the Debian-packaged corpora need apt-get and dpkg-deb "
            "(a Debian or Ubuntu machine)."
        )
    return path


def _apt_options(state: Path) -> list[str]:
    lists, cache = state / "lists", state / "cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    user = "root" if os.geteuid() == 0 else getpass.getuser()
    return [
        "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}",
        "-o", "Acquire::Languages=en", "-o", f"APT::Sandbox::User={user}",
        "-o", "Debug::NoLocking=1", "-q",
    ]  # fmt: skip


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise DataError(f"{what} failed to start: {e}") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        hint = " (is the Debian archive reachable from this machine?)" if "update" in what else ""
        raise DataError(f"{what} failed{hint}: {detail}")


def apt_update(state: Path) -> Path:
    """Fetch the package indexes (with the ``Translation-en`` descriptions) into
    ``state/lists``; returns that directory."""
    _run([_tool("apt-get"), *_apt_options(state), "update"], "apt-get update")
    return state / "lists"


def download_and_unpack(packages: list[str], state: Path, dest: Path) -> Path:
    """``apt-get download`` each package into ``state/debs`` and unpack them all under ``dest``."""
    debs = state / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    lists = state / "lists"
    if not any(lists.glob("*_Packages*")):
        apt_update(state)
    for pkg in packages:
        if not any(debs.glob(f"{pkg}_*.deb")):
            _run([_tool("apt-get"), *_apt_options(state), "download", pkg], f"apt-get download {pkg}", debs)
    dest.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        if not any(debs.glob(f"{pkg}_*.deb")):
            raise DataError(f"apt-get download {pkg} left no {pkg}_*.deb in {str(debs)!r}.")
    for deb in downloaded_debs(packages, state):
        _run([_tool("dpkg-deb"), "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
    return dest


def release_indexes(paths: list[Path]) -> list[Path]:
    """The index files of the release suites only: ``-updates``, ``-security``, ``-backports``
    and ``-proposed-updates`` indexes (and the security archive's) change between point
    releases, so a corpus built from them changes from one day to the next."""
    return [p for p in paths if not _MOVING.search(p.name) and not p.name.startswith("security.")]


def fingerprint(paths: list[Path]) -> list[dict]:
    """``[{"file", "bytes", "sha256"}]`` of the files a corpus was built from, in order."""
    out = []
    for p in paths:
        data = Path(p).read_bytes()
        out.append({"file": Path(p).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return out


def downloaded_debs(packages: list[str], state: Path) -> list[Path]:
    """The ``.deb`` files :func:`download_and_unpack` unpacked for ``packages`` (their names carry
    the package versions)."""
    return [sorted((state / "debs").glob(f"{pkg}_*.deb"))[-1] for pkg in packages]


def read_index(path: Path) -> str:
    """The text of an apt index file, whatever its compression (lz4, xz, gz, none)."""
    helper = Path("/usr/lib/apt/apt-helper")
    if path.suffix in ("", ".txt"):
        return path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".gz":
        import gzip

        return gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    if path.suffix == ".xz":
        import lzma

        return lzma.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    if not helper.exists():
        raise DataError(f"cannot decompress {path.name}: /usr/lib/apt/apt-helper is missing.")
    proc = subprocess.run([str(helper), "cat-file", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        raise DataError(f"apt-helper cat-file {path.name} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode("utf-8", errors="replace")
