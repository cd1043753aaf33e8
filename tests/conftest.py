import os

# tests never touch a hub: any accidental download fails fast instead of hanging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
