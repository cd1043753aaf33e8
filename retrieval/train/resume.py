"""The resume state of a training run: everything the checkpoint lacks to continue exactly (optimizer, schedule,
step, RNG states, the momentum model and queue inside the task's weights, the data stream's position).

    OUT/resume/task.safetensors   every weight of the task (model, momentum twin, queue)
    OUT/resume/state.pt           optimizer, schedule, step, RNG states, data position (torch.load weights_only)

state.pt is renamed into place last: its step names a complete state, so a kill mid-save leaves the previous one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model

from retrieval.errors import UserError
from retrieval.models.checkpoint import read_config

RESUME = "resume"


def has_state(out: Path) -> bool:
    return (out / RESUME / "state.pt").exists()


def save_state(out: Path, task, opt, sched, step: int, data_state: dict[str, Any]) -> None:
    state_dir = out / RESUME
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / ".task.safetensors.tmp"
    save_model(task, str(tmp))
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "sampler_rng": task.sampler.get_state(),
        **data_state,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(state, state_dir / ".state.pt.tmp")
    os.replace(tmp, state_dir / "task.safetensors")
    os.replace(state_dir / ".state.pt.tmp", state_dir / "state.pt")


def load_state(out: Path, task, opt, sched) -> tuple[int, dict[str, Any]]:
    """Restore the task, optimizer, schedule and RNGs; returns (step, the whole saved dict); (0, {}) if none."""
    state_dir = out / RESUME
    if not has_state(out):
        return 0, {}
    missing, unexpected = task.load_state_dict(load_file(str(state_dir / "task.safetensors")), strict=False)
    if missing or unexpected:
        raise UserError(
            f"{state_dir}: the saved state does not fit this config (e.g. {(missing or unexpected)[0]})"
        )
    state = torch.load(state_dir / "state.pt", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    task.sampler.set_state(state["sampler_rng"])
    return int(state["step"]), state


def truncate_log(path: Path, step: float) -> None:
    """A resumed run rewrites the lines past its resume point, so the curve continues without duplicates."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def is_refined(out: Path) -> bool:
    """Whether the checkpoint in `out` has been through the ITM refinement stage."""
    try:
        return bool(read_config(out).get("training", {}).get("refined"))
    except (UserError, OSError, ValueError):  # no or unreadable checkpoint: not refined
        return False
