"""Model loading for inference, fast: no random numbers drawn for weights that are loaded right after, only the
tensors a command uses (a text query needs the text tower alone), and file digests remembered by (path, size,
mtime) so that a 600 MB weights file is not hashed again by every search.

A cold `retrieval search` on ViT-B-32 spent most of its non-import time here: random init of every weight, reading
and copying the image tower it never runs, and hashing the weights file for the collection's model check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator

import torch

from retrieval.config import cache_dir

_DIGEST_ENTRIES = 256  # digests remembered; the oldest are forgotten first


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """torch.nn.init's in-place initialisers do nothing inside the block. Only for models whose every weight is
    loaded next (or never used): the values left are whatever the allocator returned."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}

    def keep(tensor, *args, **kwargs):
        return tensor

    for name in names:
        setattr(torch.nn.init, name, keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def load_safetensors(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> dict:
    """The tensors of a .safetensors file whose names `keep` accepts (all by default), read lazily: the rest of
    the file is never read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}


def is_visual(name: str) -> bool:
    """An OpenCLIP state-dict key of the image tower."""
    return name.startswith("visual.")


def _digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of the file's bytes, remembered under its real path with its size, mtime and inode: the same
    quick check make and rsync trust. A cache that cannot be read or written is only slower, never wrong."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    cache = cache_dir() / "digests.json"
    try:
        entries = json.loads(cache.read_text())
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    hit = entries.get(real)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("digest"), str):
        return hit["digest"]
    digest = _digest(real)
    entries.pop(real, None)
    entries[real] = {"stamp": stamp, "digest": digest}  # dicts keep insertion order: the newest last
    for old in list(entries)[: max(0, len(entries) - _DIGEST_ENTRIES)]:
        del entries[old]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".digests.")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest


def load_text_weights(model: torch.nn.Module, path: str | os.PathLike) -> bool:
    """Load only the non-image-tower weights of an OpenCLIP weights file into `model`, reading the file lazily
    (safetensors, or torch's zip format memory-mapped). False, with nothing loaded, when the file needs
    open_clip's own conversions (another layout, resized positions, a TorchScript archive): load it in full then.
    """
    try:
        if str(path).endswith(".safetensors"):
            state = load_safetensors(path, lambda k: not is_visual(k))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                return False
            state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(k, str)}
            state = {k: v for k, v in state.items() if not is_visual(k)}
    except Exception:  # noqa: BLE001 - any format this fast path does not know goes through open_clip
        return False
    wanted = {k: v for k, v in model.state_dict().items() if not is_visual(k)}
    if set(wanted) != set(state) or any(
        not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in wanted.items()
    ):
        return False
    model.load_state_dict(state, strict=False)
    return True
