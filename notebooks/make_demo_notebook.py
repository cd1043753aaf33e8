"""Writes notebooks/demo.ipynb (outputs stripped). Edit the cells here, then: python3 notebooks/make_demo_notebook.py"""

from pathlib import Path

import nbformat as nbf

cells = [
    (
        "md",
        """# The demo path: scenes -> train -> evaluate -> index -> search

The same path as `bash demo.sh`, one step per cell, with the training curves plotted. Everything runs offline on
data the project generates. `STEPS` below is short so the notebook runs in a few minutes on 2 CPU cores; the
default `retrieval train` (its defaults: a joint ITC run, then the ITM refinement stage; about 12 min) is what the README's figures
come from.""",
    ),
    (
        "code",
        """import json
import os
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
from PIL import Image

OUT = Path(os.environ.get("DEMO_OUT", "notebook_run"))
STEPS = int(os.environ.get("DEMO_STEPS", "300"))
REFINE = int(os.environ.get("DEMO_REFINE", "700"))  # the refinement stage: where ITM learns a relation's direction


def sh(*args):
    \"\"\"Run a `retrieval` command; return its stdout (progress bars go to stderr).\"\"\"
    done = subprocess.run(["retrieval", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return done.stdout""",
    ),
    (
        "md",
        "## 1. Generate captioned scenes\nA held-out split shows colour/shape combinations training never sees.",
    ),
    (
        "code",
        """sh("data", "synth", OUT / "scenes", "-n", 3000, "--seed", 0)
rows = [json.loads(line) for line in open(OUT / "scenes/heldout.jsonl")]
fig, axes = plt.subplots(1, 6, figsize=(15, 3))
for ax, row in zip(axes, rows, strict=False):
    ax.imshow(Image.open(OUT / "scenes" / row["image"]))
    ax.set_title(row["caption"].replace(" to the", "\\nto the").replace(" above", "\\nabove").replace(" below", "\\nbelow"), fontsize=8)
    ax.axis("off")""",
    ),
    (
        "md",
        "## 2. Train ITC + ITM with hard negatives\nThe tiny preset, evaluated on the held-out split as it trains.",
    ),
    (
        "code",
        """sh("train", OUT / "scenes/train.jsonl", "--out", OUT / "model", "--quiet",
   "--set", f"steps={STEPS}", "--set", f"refine.steps={REFINE}",
   "--set", f"eval_pairs={OUT / 'scenes/heldout.jsonl'}", "--set", "eval_every=100")
log = [json.loads(line) for line in open(OUT / "model/log.jsonl")]
train_rows = [r for r in log if "itc" in r]
refine_rows = [r for r in log if r.get("stage") == "refine" and "itm" in r]
eval_rows = [r for r in log if "eval.t2i.R@1" in r]
len(train_rows), len(eval_rows)""",
    ),
    ("md", "## 3. Training curves"),
    (
        "code",
        """steps = [r["step"] for r in train_rows]
fig, axes = plt.subplots(1, 4, figsize=(18, 3.5))
axes[0].plot(steps, [r["itc"] for r in train_rows], label="ITC")
if "itm" in train_rows[-1]:  # objectives.joint_itm=true: ITM in the joint run too
    axes[0].plot(steps, [r["itm"] for r in train_rows], label="ITM")
axes[0].set_title("joint-run losses")
axes[0].legend()
axes[1].plot([r["step"] - STEPS for r in refine_rows], [r["itm_acc"] for r in refine_rows])
axes[1].set_title("ITM accuracy in the refinement stage (1 positive : 2 negatives)")
axes[2].plot(steps, [r["lr"] for r in train_rows])
axes[2].set_title("learning rate (warmup + cosine)")
axes[3].plot(steps, [r["temperature"] for r in train_rows])
axes[3].set_title("learned temperature")
for ax in axes:
    ax.set_xlabel("step")
plt.figure(figsize=(6, 3.5))
for key in ("eval.t2i.R@1", "eval.t2i.R@5", "eval.i2t.R@1"):
    plt.plot([r["step"] for r in eval_rows], [r[key] for r in eval_rows], marker="o", label=key[5:])
plt.title("held-out recall during training")
plt.xlabel("step")
plt.legend();""",
    ),
    (
        "md",
        """## 3b. The ITM refinement stage
Towers frozen, the fusion encoder alone (started afresh) ranks each caption over its opposite-relation twin, each
image over its mirror, and the mirror with the twin caption over both. The direction's accuracies sit near chance
for a couple of hundred steps, then climb: a saddle, not a slope.""",
    ),
    (
        "code",
        """plt.figure(figsize=(7, 3.5))
for key in ("rank_relation_acc", "rank_mirror_acc", "rank_square_image_acc", "rank_binding_acc", "itm_acc"):
    plt.plot([r["step"] - STEPS for r in refine_rows], [r.get(key) for r in refine_rows], label=key)
plt.xlabel("refinement step")
plt.ylim(0.4, 1.0)
plt.legend();""",
    ),
    ("md", "## 4. Evaluate: recall both ways, ITM re-ranking of the top 16, attribute binding"),
    (
        "code",
        """report = json.loads(sh("eval", OUT / "scenes/heldout.jsonl", "--checkpoint", OUT / "model", "--rerank", 16, "--json"))
{k: round(v, 3) if isinstance(v, float) else v for k, v in report.items()}""",
    ),
    ("md", "## 5. Index the held-out images with the trained model and search them by text"),
    (
        "code",
        """sh("index", OUT / "scenes/images/heldout", "--db", OUT / "collection", "--checkpoint", OUT / "model")
query = "a large red circle to the left of a small blue square"
hits = json.loads(sh("search", query, "--db", OUT / "collection", "-k", 8, "--rerank", 16, "--json"))
fig, axes = plt.subplots(1, 8, figsize=(18, 2.8))
for ax, hit in zip(axes, hits, strict=False):
    ax.imshow(Image.open(hit["path"]))
    ax.set_title(f"itm {hit['itm']:.2f}")
    ax.axis("off")
fig.suptitle(query);""",
    ),
]

nb = nbf.v4.new_notebook()
nb.cells = [
    nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, Path(__file__).with_name("demo.ipynb"))
