"""Word-level tokenizer whose vocabulary (a JSON list) ships with the model."""

from __future__ import annotations

import json
import os
import re

import torch

from .files import write_json_atomically

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
_WORD = re.compile(r"[a-z]+|,")


class ToyTokenizer:
    """Lower-cases, splits into words and commas, maps unknown words to ``<unk>``, ends with ``<eos>``.

    Ids: ``<pad>`` = 0, ``<unk>`` = 1, ``<eos>`` = 2, then the words. An empty caption encodes
    to ``[<eos>]``; that is the unconditional caption classifier-free guidance uses.
    """

    def __init__(self, words: list[str], max_length: int = 32) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        specials = [PAD, UNK, EOS]
        if len(set(words)) != len(words) or any(w in specials for w in words):
            raise ValueError("words must be unique and must not contain the special tokens")
        self.tokens = specials + list(words)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, truncated so that ``<eos>`` always fits in ``max_length``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        kept, _ = self._split(text)
        return [self.ids.get(w, self.ids[UNK]) for w in kept] + [self.ids[EOS]]

    def unknown_and_cut(self, text: str) -> tuple[list[str], list[str]]:
        """Words of ``text`` that ``encode`` maps to ``<unk>`` (never seen in training), and those it cuts
        off to fit ``max_length``."""
        kept, cut = self._split(text)
        return [w for w in kept + cut if w not in self.ids], cut

    def _split(self, text: str) -> tuple[list[str], list[str]]:
        """The words of ``text`` that ``encode`` keeps, and those past ``max_length`` (``<eos>`` included)."""
        words = _WORD.findall(text.lower())
        return words[: self.max_length - 1], words[self.max_length - 1:]

    def decode(self, ids: list[int]) -> str:
        """Words of ``ids`` up to ``<eos>``, pads dropped; commas attach to the word before."""
        words = []
        for i in ids:
            tok = self.tokens[int(i)]
            if tok == EOS:
                break
            if tok != PAD:
                words.append(tok)
        return " ".join(words).replace(" ,", ",")

    def __call__(self, texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch encode, right-padded to ``max_length``: (input_ids long (B, L), attention_mask bool (B, L)).

        Always ``max_length``, as WanPipeline pads to its max_sequence_length: Wan's cross-attention
        takes no mask, so the zero states past a caption are attended to, and their number must not
        depend on the other captions of the batch.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("texts must not be empty")
        enc = [self.encode(t) for t in texts]
        ids = torch.zeros(len(enc), self.max_length, dtype=torch.long)
        for b, e in enumerate(enc):
            ids[b, : len(e)] = torch.tensor(e)
        return ids, ids != self.ids[PAD]

    def to_dict(self) -> dict:
        """What ``save`` writes and ``load`` reads."""
        return {"words": self.tokens[3:], "max_length": self.max_length}

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomically(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ToyTokenizer":
        with open(path) as f:
            data = json.load(f)
        return cls(data["words"], data["max_length"])
