"""Folder scanning on the trees real users have: symlink loops, broken links, hidden caches, any script in names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from retrieval.data.scan import FileEntry, ScanProblem, scan_images
from retrieval.errors import UserError


def _touch(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(rel) + 1))  # contents do not matter to the scan, sizes differ


def _rel(entries, root: Path) -> list[str]:
    return [os.path.relpath(e.path, root) for e in entries]


def test_nested_folders_in_sorted_depth_first_order(tmp_path):
    # created out of order, so a scan that trusted the filesystem's listing order would differ
    _touch(tmp_path, "z.jpg", "b/c/deep.png", "a.jpg", "b/a.gif", "b/z.webp", "aa/x.bmp", "b/c/d/e/f.tiff")
    got = _rel(scan_images([tmp_path]), tmp_path)
    assert got == ["a.jpg", "aa/x.bmp", "b/a.gif", "b/c/d/e/f.tiff", "b/c/deep.png", "b/z.webp", "z.jpg"]
    assert got == _rel(scan_images([tmp_path]), tmp_path)


def test_entries_are_absolute_with_size_and_mtime(tmp_path, monkeypatch):
    _touch(tmp_path, "photos/cat.jpg")
    monkeypatch.chdir(tmp_path)
    [entry] = scan_images(["photos"])
    st = os.stat(tmp_path / "photos/cat.jpg")
    assert entry == FileEntry(str(tmp_path / "photos/cat.jpg"), st.st_size, st.st_mtime_ns)
    assert os.path.isabs(entry.path)


def test_extensions_filter_is_case_insensitive(tmp_path):
    _touch(tmp_path, "A.JPG", "b.Png", "c.TIFF", "d.txt", "e.jpg.txt", "f.raw", "jpg", "g.heic", "h.JPEG")
    assert _rel(scan_images([tmp_path]), tmp_path) == ["A.JPG", "b.Png", "c.TIFF", "h.JPEG"]


def test_hidden_files_and_folders(tmp_path):
    _touch(tmp_path, "seen.jpg", ".hidden.jpg", ".thumbnails/t.jpg", "sub/.x/y.png", "sub/ok.png")
    assert _rel(scan_images([tmp_path]), tmp_path) == ["seen.jpg", "sub/ok.png"]
    everything = _rel(scan_images([tmp_path], include_hidden=True), tmp_path)
    assert everything == [".hidden.jpg", ".thumbnails/t.jpg", "seen.jpg", "sub/.x/y.png", "sub/ok.png"]
    # a root is taken as given, even when its own name is hidden
    assert _rel(scan_images([tmp_path / ".thumbnails"]), tmp_path) == [".thumbnails/t.jpg"]


def test_unicode_names(tmp_path):
    names = ["café/crème brûlée.jpg", "日本語/猫 🐱.png", "Ελληνικά.webp"]
    _touch(tmp_path, *names)
    assert sorted(_rel(scan_images([tmp_path]), tmp_path)) == sorted(names)


def test_symlink_loop_terminates_and_is_reported(tmp_path):
    _touch(tmp_path, "album/a.jpg", "album/sub/b.jpg")
    (tmp_path / "album/sub/up").symlink_to(tmp_path / "album", target_is_directory=True)
    (tmp_path / "album/self").symlink_to(tmp_path / "album/self")  # a link to itself: ELOOP on stat
    problems: list[ScanProblem] = []
    got = _rel(scan_images([tmp_path / "album"], problems=problems), tmp_path)
    assert got == ["album/a.jpg", "album/sub/b.jpg"]
    reasons = {os.path.relpath(p.path, tmp_path): p.reason for p in problems}
    assert reasons["album/sub/up"] == "symlink loop"
    assert "album/self" in reasons


def test_broken_symlink_is_reported_not_raised(tmp_path):
    _touch(tmp_path, "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "gone_dir").symlink_to(tmp_path / "deleted_dir", target_is_directory=True)
    problems: list[ScanProblem] = []
    assert _rel(scan_images([tmp_path], problems=problems), tmp_path) == ["ok.jpg"]
    assert ScanProblem(str(tmp_path / "gone.jpg"), "broken symlink") in problems
    assert ScanProblem(str(tmp_path / "gone_dir"), "broken symlink") in problems
    assert _rel(scan_images([tmp_path]), tmp_path) == ["ok.jpg"]  # no problems list: still no raise


def test_symlinks_are_followed_and_keep_their_own_names(tmp_path):
    _touch(tmp_path, "elsewhere/trip/beach.jpg", "root/real.jpg")
    root = tmp_path / "root"
    (root / "trip").symlink_to(tmp_path / "elsewhere/trip", target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "real.jpg")
    entries = list(scan_images([root]))
    assert _rel(entries, root) == ["alias.jpg", "real.jpg", "trip/beach.jpg"]
    alias = entries[0]
    assert alias.size == os.stat(root / "real.jpg").st_size  # the target's size, not the link's
    (tmp_path / "linked_root").symlink_to(root, target_is_directory=True)
    via_link = [e.path for e in scan_images([tmp_path / "linked_root"])]
    assert via_link[0] == str(tmp_path / "linked_root/alias.jpg")  # a root is not resolved either


def test_two_links_to_one_folder_scan_it_once(tmp_path):
    _touch(tmp_path, "root/z_real/p.jpg")
    (tmp_path / "root/a_link").symlink_to(tmp_path / "root/z_real", target_is_directory=True)
    assert _rel(scan_images([tmp_path / "root"]), tmp_path) == ["root/a_link/p.jpg"]


def test_file_roots_and_overlapping_roots_yield_each_file_once(tmp_path):
    _touch(tmp_path, "dir/a.jpg", "dir/sub/b.png", "notes.txt")
    roots = [tmp_path / "dir/a.jpg", tmp_path / "dir", tmp_path / "dir/sub", str(tmp_path / "dir") + "/"]
    assert _rel(scan_images(roots), tmp_path) == ["dir/a.jpg", "dir/sub/b.png"]
    assert _rel(scan_images([tmp_path / "dir/sub", tmp_path / "dir/a.jpg"]), tmp_path) == [
        "dir/sub/b.png",
        "dir/a.jpg",
    ]
    problems: list[ScanProblem] = []
    assert list(scan_images([tmp_path / "notes.txt"], problems=problems)) == []
    assert problems == [ScanProblem(str(tmp_path / "notes.txt"), "not an image file name")]


def test_nonexistent_root_raises_user_error_at_the_call(tmp_path):
    _touch(tmp_path, "a.jpg")
    missing = tmp_path / "no_such_folder"
    with pytest.raises(UserError, match="no_such_folder: no such file or directory$"):
        scan_images([tmp_path, missing])  # before anything is yielded, not at the first next()


def test_unreadable_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    _touch(tmp_path, "a/1.jpg", "locked/2.jpg", "z/3.jpg")
    locked = str(tmp_path / "locked")
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, which the tests may run as
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems: list[ScanProblem] = []
    assert _rel(scan_images([tmp_path], problems=problems), tmp_path) == ["a/1.jpg", "z/3.jpg"]
    assert problems == [ScanProblem(locked, "permission denied")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_unreadable_folder_for_real(tmp_path):
    _touch(tmp_path, "locked/2.jpg", "ok.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        problems: list[ScanProblem] = []
        assert _rel(scan_images([tmp_path], problems=problems), tmp_path) == ["ok.jpg"]
        assert [p.reason for p in problems] == ["permission denied"]
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_scan_streams_one_folder_at_a_time(tmp_path, monkeypatch):
    _touch(tmp_path, "a/1.jpg", "b/2.jpg", "c/3.jpg")
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path):
        listed.append(os.path.basename(os.fspath(path)))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = scan_images([tmp_path])
    assert os.path.basename(next(entries).path) == "1.jpg"
    assert "c" not in listed  # the first file came out before the rest of the tree was listed
    assert [os.path.basename(e.path) for e in entries] == ["2.jpg", "3.jpg"]


def test_deep_tree_does_not_recurse(tmp_path):
    deep = os.path.join(tmp_path, *["d"] * 150)
    os.makedirs(deep)
    Path(deep, "bottom.jpg").write_bytes(b"x")
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 100)  # a scan that recursed once per folder level would need 150 more
    try:
        entries = list(scan_images([tmp_path]))
    finally:
        sys.setrecursionlimit(limit)
    assert [e.path for e in entries] == [os.path.join(deep, "bottom.jpg")]
