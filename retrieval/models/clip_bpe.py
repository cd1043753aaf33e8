"""CLIP's byte-level BPE tokenizer without torch or open_clip: what a cold text search needs to turn a query into
token ids. It reads the merges file open_clip ships (found without importing open_clip) and gives the ids
open_clip's SimpleTokenizer gives with its default cleaning (ftfy, HTML entities, whitespace, lower case);
text_numpy.export checks that on sample texts before it relies on it.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os

import ftfy
import numpy as np
import regex

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (word-final or not) + merges + 2 specials
SOT, EOT = "<start_of_text>", "<end_of_text>"


def merges_file() -> str:
    """open_clip's bpe_simple_vocab_16e6.txt.gz, located without executing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "bpe_simple_vocab_16e6.txt.gz")


@functools.lru_cache(maxsize=1)
def _byte_symbols() -> dict[int, str]:
    """Every byte as a printable character: printable Latin-1 bytes stand for themselves, the others are moved
    past 255 in order (GPT-2's reversible mapping, which CLIP's vocabulary is written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ClipBPE:
    def __init__(self, path: str | None = None, context_length: int = 77):
        with gzip.open(path or merges_file(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        table = _byte_symbols()
        # the vocabulary lists the bytes that stand for themselves first, then the moved ones
        symbols = [table[b] for b in sorted(table, key=lambda b: (table[b] != chr(b), b))]
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.sot, self.eot = self.ids[SOT], self.ids[EOT]
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self._words = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._cache: dict[str, list[str]] = {}

    def _merge(self, word: str) -> list[str]:
        """The BPE pieces of one pre-token (its bytes as symbols): repeatedly join the best-ranked adjacent pair."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
            best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 10000:
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = " ".join(text.split()).lower()
        table = _byte_symbols()
        out: list[int] = []
        for token in self._words.findall(text):
            if token in (SOT, EOT):  # written out in the text, they are the special tokens (as in open_clip)
                out.append(self.ids[token])
                continue
            word = "".join(table[b] for b in token.encode("utf-8"))
            out.extend(self.ids[piece] for piece in self._merge(word))
        return out

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(B, context_length) int64 ids: start, the text's ids, end, zero padding; too long: cut, end kept."""
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out
