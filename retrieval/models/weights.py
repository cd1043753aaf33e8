"""Which weights a model gets when nobody says, and whether published weights can be had right now.

The default is a real pretrained model (rclip and clip-retrieval users expect one): a photo library embedded
with random weights answers every search with noise. Published weights are fetched once from the Hugging Face
hub; offline that must fail at once, with the ways out, not after the hub client's retries and time-outs.
"""

from __future__ import annotations

import os
import socket
import threading

import open_clip

from retrieval.errors import RuntimeFailure

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_TAG = "laion2b_s34b_b79k"  # OpenCLIP's LAION-2B ViT-B-32: the usual rclip / clip-retrieval choice
RANDOM = "none"  # the one way to ask for random weights: by name
HUB_HOST = ("huggingface.co", 443)
PROBE_SECONDS = 2.0  # a reachable hub answers a TCP connect in well under this; DNS alone may hang longer


def default_tag(arch: str) -> str | None:
    """The tag `--model ARCH` gets without `--pretrained`: ours for ViT-B-32, else ARCH's first LAION tag,
    else its first published tag; None when ARCH has no published weights (our presets)."""
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if arch == DEFAULT_ARCH and DEFAULT_TAG in tags:
        return DEFAULT_TAG
    laion = [t for t in tags if t.startswith("laion")]
    return (laion or tags or [None])[0]


def cached_file(arch: str, tag: str) -> str | None:
    """The local copy of ARCH/TAG's weights when an earlier run downloaded them, else None."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/file", or "org/name/" for the default file
        for name in (
            [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        ):
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        return path if os.path.isfile(path) else None
    return None


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """A TCP connect to the hub, bounded in time even when name resolution hangs (it runs in a thread)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def ensure_fetchable(arch: str, tag: str) -> None:
    """Return when ARCH/TAG's weights are on disk or the hub answers; raise RuntimeFailure (exit 1) at once
    otherwise. With a local copy and no network, the hub client is put offline so it does not wait on it."""
    if cached_file(arch, tag):
        if not hub_reachable():
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True  # read at call time: serve the cached copy without retries
        return
    if not hub_reachable():
        raise RuntimeFailure(
            f"cannot download the pretrained weights {arch}/{tag}: no network. Ways out: "
            f"--pretrained FILE (a local OpenCLIP weights file for {arch}), --checkpoint DIR (a model trained "
            "with `retrieval train`), or --pretrained none (random weights, explicitly: searches mean nothing)"
        )
