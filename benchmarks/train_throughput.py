"""Training samples/s of our loop against a minimal loop written directly on open_clip's own ClipLoss.

    python benchmarks/train_throughput.py --steps 30

Same architecture, batch, data (synthetic scenes decoded once) and threads, in one run. Ours runs through
`retrieval.train.loop.train` (batch plan, logging, checkpoint at the end) with ITC only and no generated negatives,
which is the same objective as the reference; for information, beside it: the default joint step (ITC with one
rule-made negative caption per pair; the ITM refinement stage that follows it is not timed here) and ALBEF's
joint step with ITM (objectives.joint_itm=true).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def reference(pairs_file: Path, arch: str, batch: int, steps: int) -> float:
    """The loop a user would write from open_clip's README: create_model, ClipLoss, AdamW."""
    import open_clip
    from open_clip.loss import ClipLoss

    from retrieval.models.encoders import (
        create_untrained,  # our presets' model, conv stem included
        normalize,
    )
    from retrieval.train.data import PairImages, load_pairs

    torch.manual_seed(0)
    model = create_untrained(arch)  # open_clip.create_model, plus the preset's conv stem if it has one
    tokenizer = open_clip.get_tokenizer(arch)
    pairs = load_pairs(pairs_file)
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    images = PairImages(pairs, size, cache=True, max_cache_gb=4, progress=False).cache
    tokens = tokenizer([p.caption for p in pairs])
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    cfg = model.visual.preprocess_cfg
    gen = torch.Generator().manual_seed(0)
    start = None
    for step in range(steps + 3):
        if step == 3:  # warm-up steps excluded, as in ours (its first log line is dropped)
            start = time.perf_counter()
        idx = torch.randint(0, len(pairs), (batch,), generator=gen)
        x = normalize(images[idx], cfg["mean"], cfg["std"], torch.device("cpu"))
        image_features, text_features, logit_scale = model(x, tokens[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def ours(
    pairs_file: Path, arch: str, batch: int, steps: int, name: str, sets: list[str], work: Path
) -> float:
    from retrieval.train.config import load_train_config
    from retrieval.train.loop import train

    out = work / f"ours-{name}"
    cfg = load_train_config(
        None,
        [
            f"model.arch={arch}",
            f"batch_size={batch}",
            f"steps={steps + 3}",
            "log_every=1",
            f"save_every={10**9}",
            "refine.steps=0",  # joint steps only
            *sets,
        ],
    )
    train(str(pairs_file), out, cfg, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in log[3:]]  # per-step rates; drop the warm-up steps
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean = total samples / total time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny-cvit-64")
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n", type=int, default=2000, help="scenes to generate")
    args = parser.parse_args()

    from retrieval.data.synth import SynthConfig, generate

    work = Path(tempfile.mkdtemp(prefix="retrieval-train-bench-"))
    generate(work / "scenes", SynthConfig(n=args.n), progress=False)
    pairs = work / "scenes" / "train.jsonl"
    print(
        f"{torch.get_num_threads()} threads; arch {args.arch}, batch {args.batch_size}, {args.steps} timed steps"
    )
    ref = reference(pairs, args.arch, args.batch_size, args.steps)
    print(f"open_clip ClipLoss minimal loop: {ref:7.1f} samples/s", flush=True)
    runs = [
        (
            "ITC only",
            "itc",
            ["objectives.itm=false", "objectives.text_negatives=false"],
            "the same objective as the reference",
        ),
        ("default joint step", "default", ["objectives.itm=false"], "+ a negative caption per pair"),
        ("joint step with ITM", "itm", ["objectives.joint_itm=true"], "+ the ITM fusion pass"),
    ]
    for label, name, sets, note in runs:
        rate = ours(pairs, args.arch, args.batch_size, args.steps, name, sets, work)
        print(f"ours, {label + ':':<26}{rate:7.1f} samples/s  ({rate / ref:.2f}x; {note})", flush=True)


if __name__ == "__main__":
    main()
