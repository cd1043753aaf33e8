"""The six connector types at one training budget with one LLM: image tokens per image, held-out VQA accuracy
per kind, training step time, answer latency, peak memory. Each connector runs in its own process (peak RSS).

    python benchmarks/vlm_connectors.py --data runs/scenes/vqa_train.jsonl --eval runs/scenes/vqa_heldout.jsonl \
        --vision runs/vision16 --steps 30 --eval-limit 250 --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TYPES = ("linear", "mlp2x_gelu", "downsample2x2", "resampler", "patches", "xattn")


def one(args: argparse.Namespace, kind: str) -> dict:
    import torch

    from retrieval.pipelines.answer import answer_stream
    from retrieval.train.vlm import train_vlm
    from retrieval.train.vlm_config import load_vlm_config

    torch.set_num_threads(args.threads)
    cfg = load_vlm_config(
        None,
        [
            f"llm={args.llm}",
            f"connector.type={kind}",
            f"steps={args.steps}",
            "time_budget_min=0",
            f"eval_questions={args.eval}",
            f"eval_every={args.steps}",
            f"eval_limit={args.eval_limit}",
            f"save_every={args.steps}",
            "log_every=5",
            "warmup_steps=5",
        ],
    )
    out = Path(args.out) / kind
    result = train_vlm(args.data, out, args.vision, cfg, progress=False)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "cpu_s_per_step" in r]
    vlm = result["model"].eval()
    row = json.loads(Path(args.eval).read_text().splitlines()[0])
    image = str(Path(args.eval).parent / row["image"])
    list(answer_stream(vlm, image, row["question"]))  # warm
    t = time.perf_counter()
    for _ in range(3):
        list(answer_stream(vlm, image, row["question"]))
    return {
        "connector": kind,
        "image_tokens": vlm.connector.tokens,
        "accuracy": result["metrics"].get("vqa"),
        "per_kind": {k[4:]: v for k, v in result["metrics"].items() if k.startswith("vqa.")},
        "final_loss": steps[-1]["loss"],  # answer-token loss of the last logged steps
        "cpu_s_per_step": round(sum(r["cpu_s_per_step"] for r in steps) / len(steps), 2),
        "wall_s": next(r["train_wall_s"] for r in log if "train_wall_s" in r),
        "answer_latency_ms": round((time.perf_counter() - t) / 3 * 1000, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--vision", required=True)
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-limit", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args, args.one)))
        return
    rows = []
    for kind in args.types.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", kind]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{kind}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    kinds = sorted({k for r in rows for k in r["per_kind"]})
    print(
        "| connector | image tokens | accuracy | "
        + " | ".join(kinds)
        + " | CPU-s/step | answer ms | peak RSS MiB |"
    )
    print("|---" * (7 + len(kinds)) + "|")
    for r in rows:
        cells = [
            r["connector"],
            r["image_tokens"],
            r["accuracy"],
            *(r["per_kind"].get(k) for k in kinds),
            r.get("final_loss"),
            r["cpu_s_per_step"],
            r["answer_latency_ms"],
            r["peak_rss_mib"],
        ]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
