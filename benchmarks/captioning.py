"""Captioning and bootstrap throughput, and where the bootstrap's time goes.

    python benchmarks/captioning.py --captioner OUT/captioner --filter OUT/filter --pairs noisy/train.jsonl -n 256

Prints JSON: greedy captions/s batched (64 images a batch) against one image at a time, the KV cache against
recomputing the prefix, nucleus sampling of the bootstrap's N captions per image, and a bootstrap of n images
split into decode, captioning and ITM scoring (CPU seconds of this process). Set OMP_NUM_THREADS to compare
like with like.
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


def _timed(fn):
    t0 = time.process_time()
    result = fn()
    return result, time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captioner", required=True)
    ap.add_argument("--filter", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("-n", type=int, default=256)
    ap.add_argument("--samples", type=int, default=2)
    args = ap.parse_args()

    from retrieval.data.pairs import load_pairs
    from retrieval.models.captioner import load_captioner
    from retrieval.models.generate import GenerateConfig
    from retrieval.pipelines.bootstrap import BootstrapConfig, bootstrap
    from retrieval.pipelines.caption import caption_pixels, image_size, pixels_of
    from retrieval.pipelines.itm_filter import FilterScorer

    device = torch.device("cpu")
    model, _, _ = load_captioner(args.captioner)
    pairs = load_pairs(args.pairs)[: args.n]
    (pixels, _), decode_s = _timed(lambda: pixels_of(image_size(model), [p.image for p in pairs]))
    out: dict = {"images": len(pairs), "threads": torch.get_num_threads(), "decode_cpu_s": round(decode_s, 2)}
    greedy = GenerateConfig()
    _, batched = _timed(
        lambda: [caption_pixels(model, pixels[i : i + 64], greedy, device) for i in range(0, len(pixels), 64)]
    )
    one = min(64, len(pixels))
    _, single = _timed(lambda: [caption_pixels(model, pixels[i : i + 1], greedy, device) for i in range(one)])
    _, no_cache = _timed(
        lambda: [
            caption_pixels(model, pixels[i : i + 64], GenerateConfig(use_cache=False), device)
            for i in range(0, len(pixels), 64)
        ]
    )
    sample = GenerateConfig(top_p=0.9)
    _, sampled = _timed(
        lambda: [
            caption_pixels(model, pixels[i : i + 64], sample, device, args.samples)
            for i in range(0, len(pixels), 64)
        ]
    )
    out.update(
        {
            "captions_per_cpu_s_batched": round(len(pixels) / batched, 1),
            "captions_per_cpu_s_one_at_a_time": round(one / single, 1),
            "batched_over_one_at_a_time": round((len(pixels) / batched) / (one / single), 2),
            "captions_per_cpu_s_without_cache": round(len(pixels) / no_cache, 1),
            "cache_speedup": round(no_cache / batched, 2),
            f"nucleus_{args.samples}_per_image_captions_per_cpu_s": round(
                len(pixels) * args.samples / sampled, 1
            ),
        }
    )
    scorer = FilterScorer(args.filter, device)
    caps = [p.caption for p in pairs]
    _, itm = _timed(
        lambda: [
            scorer.score(pixels[i : i + 64], caps[i : i + 64], list(range(len(caps[i : i + 64]))))
            for i in range(0, len(pixels), 64)
        ]
    )
    out["itm_scores_per_cpu_s"] = round(len(pixels) / itm, 1)
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "pairs.jsonl"
        subset.write_text("".join(json.dumps({"image": p.image, "caption": p.caption}) + "\n" for p in pairs))
        report, boot = _timed(
            lambda: bootstrap(
                str(subset),
                Path(tmp) / "out",
                args.captioner,
                args.filter,
                BootstrapConfig(samples=args.samples),
                progress=False,
            )
        )
    out["bootstrap_pairs_per_cpu_s"] = round(len(pairs) / boot, 1)
    per_image = {"decode": decode_s, "caption": sampled, "itm": itm * (1 + args.samples)}
    total = sum(per_image.values())
    out["bootstrap_time_share"] = {k: round(v / total, 3) for k, v in per_image.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
