"""The tiny model every training test starts from: seconds per run on 2 cores."""

TINY_MODEL = [
    "model.arch=test-micro",
    "model.fusion.width=32",
    "model.fusion.layers=1",
    "model.fusion.heads=2",
    "batch_size=16",
    "log_every=1",
    "optim.warmup_steps=2",
]
