"""Writes notebooks/capfilt.ipynb (outputs stripped). Edit the cells here, then:
python3 notebooks/make_capfilt_notebook.py"""

from pathlib import Path

import nbformat as nbf

cells = [
    (
        "md",
        """# Caption bootstrapping (BLIP CapFilt): what the filter dropped and what the captioner wrote

`retrieval capfilt` pre-trains on noisy pairs, fine-tunes a filter (ITM) and a captioner on a small clean set,
rewrites the noisy set and trains a fresh model on it. This notebook runs a short loop on generated scenes (30% of
the captions swapped for other images' captions) unless `CAPFILT_OUT` names a finished run, then shows dropped
web captions and the synthetic captions kept for the same images, beside the images, and the score histograms.
Why the defaults are what they are: [docs/capfilt.md](../docs/capfilt.md).""",
    ),
    (
        "code",
        """import json
import os
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

OUT = Path(os.environ.get("CAPFILT_OUT", "capfilt_run"))
STEPS = int(os.environ.get("CAPFILT_STEPS", "100"))  # short: a few minutes on 2 CPU cores


def sh(*args):
    \"\"\"Run a `retrieval` command; return its stdout (progress bars go to stderr).\"\"\"
    done = subprocess.run(["retrieval", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return done.stdout""",
    ),
    ("md", "## 1. The loop (skipped stage by stage when `OUT` already holds it)"),
    (
        "code",
        """if not (OUT / "report.json").exists():
    sh("data", "synth", OUT / "noisy", "-n", 1500, "--noise", 0.3, "--seed", 1, "--image-size", 64)
    sh("data", "synth", OUT / "clean", "-n", 500, "--seed", 2, "--image-size", 64)
    sh("capfilt", OUT / "noisy/train.jsonl", "--clean", OUT / "clean/train.jsonl", "--out", OUT,
       "--eval", OUT / "noisy/heldout.jsonl", "--steps", STEPS, "--refine-steps", STEPS,
       "--filter-steps", STEPS // 2, "--captioner-steps", 2 * STEPS, "-q")
report = json.loads((OUT / "report.json").read_text())
report["bootstrap"]""",
    ),
    ("md", "## 2. Web captions the filter dropped, and the synthetic captions kept for the same images"),
    (
        "code",
        """def rows(name):
    return [json.loads(line) for line in (OUT / name).read_text().splitlines()]


kept, dropped = rows("pairs.jsonl"), rows("dropped.jsonl")
synthetic = {}
for r in kept:
    if r["source"] == "synthetic":
        synthetic.setdefault(r["image"], []).append(r)
fig, axes = plt.subplots(2, 4, figsize=(18, 9))
for ax, r in zip(axes.flat, dropped[:8], strict=False):
    ax.imshow(Image.open(OUT / r["image"]))
    written = "\\n".join(f"+ {s['caption']} ({s['score']:.2f})" for s in synthetic.get(r["image"], [])[:2])
    ax.set_title(f"- {r['caption']} ({r['score']:.2f})\\n{written}", fontsize=8, loc="left")
    ax.axis("off")
fig.tight_layout()""",
    ),
    ("md", "## 3. Scores: web captions kept and dropped, synthetic captions, the calibrated threshold"),
    (
        "code",
        """web = [r for r in kept + dropped if r["source"] == "web"]
plt.figure(figsize=(8, 3.5))
bins = [i / 40 for i in range(41)]
if any("noisy" in r for r in web):  # generated data knows which captions were swapped
    plt.hist([r["score"] for r in web if not r.get("noisy")], bins=bins, alpha=0.6, label="web, true caption")
    plt.hist([r["score"] for r in web if r.get("noisy")], bins=bins, alpha=0.6, label="web, swapped caption")
else:
    plt.hist([r["score"] for r in web], bins=bins, alpha=0.6, label="web")
plt.hist([r["score"] for r in kept if r["source"] == "synthetic"], bins=bins, alpha=0.6, label="synthetic, kept")
plt.axvline(report["bootstrap"]["threshold"], color="black", linestyle="--", label="threshold")
plt.yscale("log")
plt.xlabel("ITM match probability")
plt.legend();""",
    ),
    ("md", "## 4. What it bought: recall of the raw-noisy model against the bootstrapped one"),
    (
        "code",
        """{name: {k: round(v, 3) for k, v in m.items() if k.endswith("R@1")} for name, m in report.get("eval", {}).items()
 if name != "captioner"} | {"captioner": report.get("eval", {}).get("captioner")}""",
    ),
]

nb = nbf.v4.new_notebook()
nb.cells = [
    nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, Path(__file__).with_name("capfilt.ipynb"))
