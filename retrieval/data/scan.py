"""Find the image files under a set of folders: streaming, in a stable order, and safe on odd trees.

Photo folders hold symlinks (some broken, some looping back up), unreadable directories, hidden thumbnail caches
and names in every script. The scan follows symlinks, never loops, reports what it skipped instead of raising,
and yields files as it finds them so indexing can start before a 100k-file tree has been listed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from retrieval.errors import UserError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute but not resolved: a symlink keeps its own name, which is what the user sees
    size: int  # bytes, of the symlink's target for a symlink
    mtime_ns: int  # with size, what incremental indexing compares to decide a file changed


@dataclass
class ScanProblem:
    path: str
    reason: str  # short and human: "broken symlink", "permission denied", "symlink loop"


def scan_images(
    roots: Sequence[str | os.PathLike[str]],
    *,
    include_hidden: bool = False,
    problems: list[ScanProblem] | None = None,
) -> Iterator[FileEntry]:
    """Yield every image file under `roots` (folders or single files), once each, in a deterministic order.

    Within a folder, entries are visited in sorted name order and sub-folders depth-first, so the output is
    sorted by path component. Names starting with '.' are skipped unless include_hidden (a root is never
    skipped for its own name). Whatever cannot be scanned (broken symlink, unreadable folder, symlink loop)
    is appended to `problems` when given, and skipped. A root that does not exist raises UserError, at the
    call, before anything is yielded.
    """
    checked = [_check_root(root) for root in roots]
    return _scan(checked, include_hidden, problems if problems is not None else [])


def _check_root(root: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    try:
        return os.path.abspath(root), os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{os.fspath(root)}: no such file or directory") from None
    except OSError as e:
        raise UserError(f"{os.fspath(root)}: cannot access ({e.strerror or e})") from None


def _scan(
    roots: list[tuple[str, os.stat_result]], include_hidden: bool, problems: list[ScanProblem]
) -> Iterator[FileEntry]:
    # The same file can only come out twice when it is a root itself and also lies inside a folder root
    # (folders are deduplicated by identity in _walk), so only root files need remembering: memory stays
    # O(roots + folders), not O(files).
    root_files = {path for path, st in roots if not stat.S_ISDIR(st.st_mode)}
    emitted_root_files: set[str] = set()
    visited_dirs: set[tuple[int, int]] = set()

    for path, st in roots:
        if stat.S_ISDIR(st.st_mode):
            entries = _walk(path, st, include_hidden, problems, visited_dirs)
        elif not _is_image_name(path):
            problems.append(ScanProblem(path, "not an image file name"))
            continue
        elif not stat.S_ISREG(st.st_mode):
            problems.append(ScanProblem(path, "not a regular file"))
            continue
        else:
            entries = iter([FileEntry(path, st.st_size, st.st_mtime_ns)])
        for entry in entries:
            if entry.path in root_files:
                if entry.path in emitted_root_files:
                    continue
                emitted_root_files.add(entry.path)
            yield entry


def _walk(
    top: str,
    top_stat: os.stat_result,
    include_hidden: bool,
    problems: list[ScanProblem],
    visited_dirs: set[tuple[int, int]],
) -> Iterator[FileEntry]:
    """Depth-first over one folder root. An explicit stack, so deep trees cannot hit the recursion limit."""
    top_id = (top_stat.st_dev, top_stat.st_ino)
    if top_id in visited_dirs:  # the same folder given twice, or inside an earlier root: already yielded
        return
    visited_dirs.add(top_id)
    # Each frame: (folder identity, iterator over its sorted entries). Only the folders on the current path
    # hold a listing, so memory is bounded by depth x folder size, never by the size of the tree.
    stack = [(top_id, iter(_list_dir(top, problems)))]
    on_path = {top_id}
    while stack:
        dir_id, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            on_path.discard(dir_id)
            continue
        if not include_hidden and entry.name.startswith("."):
            continue
        is_image = _is_image_name(entry.name)
        try:
            # d_type answers is_dir/is_symlink without a syscall: non-image files that are not symlinks are
            # dismissed without a stat, and most of a photo folder's stat calls are for the images themselves.
            if not (is_image or entry.is_symlink() or entry.is_dir()):
                continue
            # follows symlinks. os.stat, not DirEntry.stat, for folders: on Windows only it fills st_ino.
            st = os.stat(entry.path) if entry.is_dir() else entry.stat()
        except FileNotFoundError:
            reason = "broken symlink" if entry.is_symlink() else "vanished during the scan"
            problems.append(ScanProblem(entry.path, reason))
            continue
        except OSError as e:  # ELOOP from a symlink to itself, EACCES on the target's folder, ...
            problems.append(ScanProblem(entry.path, _os_reason(e)))
            continue
        if stat.S_ISDIR(st.st_mode):
            sub_id = (st.st_dev, st.st_ino)
            if sub_id in on_path:
                problems.append(ScanProblem(entry.path, "symlink loop"))
            elif sub_id not in visited_dirs:  # a second symlink to a folder already scanned adds nothing
                visited_dirs.add(sub_id)
                on_path.add(sub_id)
                stack.append((sub_id, iter(_list_dir(entry.path, problems))))
        elif is_image:
            if stat.S_ISREG(st.st_mode):
                yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
            else:  # a FIFO or device named like an image would hang or crash the decoder
                problems.append(ScanProblem(entry.path, "not a regular file"))


def _list_dir(path: str, problems: list[ScanProblem]) -> list[os.DirEntry[str]]:
    """One folder's entries sorted by name; an unreadable folder is a problem and an empty listing."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: entry.name)
    except OSError as e:
        problems.append(ScanProblem(path, _os_reason(e)))
        return []


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission denied"
    return (e.strerror or str(e)).lower()
