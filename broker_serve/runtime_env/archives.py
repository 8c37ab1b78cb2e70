"""The sources of `working_dir` and `py_modules`, read into zip archives, checked, and extracted
(docs/architecture.md, "Runtime environments").

An archive is refused, with a message that names its source, when it is not a zip, when an
entry is absolute, climbs out with `..`, is a symlink or is encrypted, or when it holds too
much: more than `max_bytes` once extracted (declared sizes are checked first, then the bytes
actually written, since a zip may lie about them) or more than `MAX_ENTRIES` entries.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import requests

from ..exceptions import RuntimeEnvError

MAX_ENTRIES = 100_000
CONNECT_TIMEOUT_S = 10.0
_CHUNK = 1 << 16
# Never packed from a local directory: caches and version control.
_ALWAYS_EXCLUDED = ("__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def read_source(source: str, base_dir: str, *, as_module: bool, excludes: list[str],
                max_bytes: int, timeout_s: float) -> bytes:
    """The zip archive `source` names: a URL, a local zip (or wheel), or a local directory.

    A directory becomes a deterministic zip: its files at the root, or (`as_module`, for
    `py_modules`) inside a folder named after it, so that `import <its name>` finds it.
    """
    if is_url(source):
        return download(source, max_bytes, timeout_s)
    if "://" in source:
        scheme = source.split("://", 1)[0]
        raise RuntimeEnvError(f"{source!r}: {scheme}:// sources are not supported; use an "
                              "http(s):// zip, a local zip or a local directory")
    path = Path(base_dir, os.path.expanduser(source)).resolve()
    if path.is_dir():
        return pack_directory(path, path.name if as_module else "", excludes, max_bytes)
    if not path.exists():
        raise RuntimeEnvError(f"{source!r}: {path} does not exist")
    if path.suffix not in (".zip", ".whl"):
        raise RuntimeEnvError(f"{source!r}: {path} is neither a directory nor a .zip or .whl "
                              "file")
    if path.stat().st_size > max_bytes:
        raise RuntimeEnvError(f"{source!r}: {path} is {_mb(path.stat().st_size)}, over the "
                              f"limit of {_mb(max_bytes)} (BROKER_SERVE_RUNTIME_ENV_MAX_MB)")
    return path.read_bytes()


def download(url: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with requests.get(url, stream=True, allow_redirects=True,
                          timeout=(CONNECT_TIMEOUT_S, timeout_s)) as response:
            if response.status_code != 200:
                raise RuntimeEnvError(f"fetching {url} failed: HTTP {response.status_code} "
                                      f"{response.reason}")
            declared = int(response.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise RuntimeEnvError(f"{url} is {_mb(declared)}, over the limit of "
                                      f"{_mb(max_bytes)} (BROKER_SERVE_RUNTIME_ENV_MAX_MB)")
            body = bytearray()
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise RuntimeEnvError(f"{url} is over the limit of {_mb(max_bytes)} "
                                          "(BROKER_SERVE_RUNTIME_ENV_MAX_MB)")
            return bytes(body)
    except requests.RequestException as exc:
        raise RuntimeEnvError(f"fetching {url} failed: {exc}") from None


def pack_directory(path: Path, top: str, excludes: list[str], max_bytes: int) -> bytes:
    """`path`'s files as a zip whose bytes depend only on their names, contents and modes."""
    files: list[tuple[str, Path]] = []  # (name in the archive, file)
    for root, dirs, names in os.walk(path):
        relative_root = Path(root).relative_to(path)
        dirs[:] = sorted(d for d in dirs if not _excluded(relative_root / d, excludes, True))
        for name in names:
            relative = relative_root / name
            full = Path(root, name)
            if not full.is_symlink() and full.is_file() and not _excluded(relative, excludes):
                files.append((relative.as_posix(), full))
    files.sort()
    buffer = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, full in files:
            total += full.stat().st_size
            if total > max_bytes:
                raise RuntimeEnvError(f"{path} holds more than {_mb(max_bytes)} "
                                      "(BROKER_SERVE_RUNTIME_ENV_MAX_MB); leave files out with "
                                      "runtime_env's excludes")
            info = zipfile.ZipInfo(f"{top}/{name}" if top else name, _FIXED_TIME)
            info.external_attr = (stat.S_IFREG | (0o755 if os.access(full, os.X_OK) else 0o644)
                                  ) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, full.read_bytes())
    return buffer.getvalue()


def _excluded(relative: Path, excludes: list[str], is_dir: bool = False) -> bool:
    if relative.name in _ALWAYS_EXCLUDED:
        return True
    text = relative.as_posix()
    for pattern in excludes:
        pattern = pattern.strip().lstrip("/")
        if pattern.endswith("/"):
            if not is_dir:
                continue
            pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(text, pattern) or fnmatch.fnmatch(relative.name, pattern):
            return True
    return False


def check(archive: bytes, source: str, max_bytes: int) -> str:
    """Refuse what must not be extracted; return the single top-level folder that holds every
    entry (a GitHub archive's), or "" if there is none."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            infos = opened.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise RuntimeEnvError(f"{source}: not a zip archive ({exc})") from None
    if len(infos) > MAX_ENTRIES:
        raise RuntimeEnvError(f"{source}: {len(infos)} entries, over the limit of "
                              f"{MAX_ENTRIES}")
    declared = 0
    tops: set[str] = set()
    loose_file = False
    for info in infos:
        parts = _safe_parts(info.filename, source)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise RuntimeEnvError(f"{source}: entry {info.filename!r} is a symlink, which "
                                  "could point out of the directory")
        if info.flag_bits & 0x1:
            raise RuntimeEnvError(f"{source}: entry {info.filename!r} is encrypted")
        declared += info.file_size
        if parts:
            tops.add(parts[0])
            loose_file = loose_file or (len(parts) == 1 and not info.is_dir())
    if declared > max_bytes:
        raise RuntimeEnvError(f"{source}: holds {_mb(declared)} once extracted, over the limit "
                              f"of {_mb(max_bytes)} (BROKER_SERVE_RUNTIME_ENV_MAX_MB)")
    return tops.pop() if len(tops) == 1 and not loose_file else ""


def _safe_parts(name: str, source: str) -> tuple[str, ...]:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (path.parts and path.parts[0].endswith(":")) or ".." in path.parts:
        raise RuntimeEnvError(f"{source}: entry {name!r} escapes the directory it is "
                              "extracted into")
    return tuple(part for part in path.parts if part not in ("", "."))


def extract(archive: bytes, destination: Path, source: str, max_bytes: int) -> None:
    """Extract a checked archive into `destination` (a new, empty folder), counting the bytes
    written against `max_bytes`. A damaged archive (a bad CRC, truncated data) is refused."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            written = 0
            for info in opened.infolist():
                written += _extract_one(opened, info, destination, source, max_bytes - written)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise RuntimeEnvError(f"{source}: damaged zip archive ({exc})") from None


def _extract_one(opened: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path, source: str,
                 room: int) -> int:
    parts = _safe_parts(info.filename, source)
    if not parts:
        return 0
    target = destination.joinpath(*parts)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with opened.open(info) as reader, open(target, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            written += len(chunk)
            if written > room:
                raise RuntimeEnvError(f"{source}: holds more than the limit once extracted "
                                      "(BROKER_SERVE_RUNTIME_ENV_MAX_MB)")
            writer.write(chunk)
    if (info.external_attr >> 16) & 0o111:
        target.chmod(0o755)
    return written


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
