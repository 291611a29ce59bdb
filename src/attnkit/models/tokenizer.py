"""``Tokenizer``: a ``tokenizer.json`` (Hugging Face ``tokenizers``) with batching and padding."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["Tokenizer"]


class Tokenizer:
    """Text to ids and back, from a ``tokenizer.json`` file (WordPiece, BPE, Unigram, ...).

    Truncation and padding are attnkit's, not the file's: the file's own settings (some ship
    with fixed-length padding) are switched off.

    Args:
        path: ``tokenizer.json``, or a directory holding it.
        max_length: Truncate encodings to this many tokens (special tokens included).
        pad_id: Padding id; default the file's ``[PAD]``/``<pad>`` token, else 0.
    """

    def __init__(self, path: str | os.PathLike, *, max_length: int | None = None, pad_id: int | None = None):
        from tokenizers import Tokenizer as _HFTokenizer

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(
                f"Tokenizer: expected a tokenizer.json file, but {str(p)!r} does not exist."
            )
        self.path = p
        self._tok = _HFTokenizer.from_file(str(p))
        self._tok.no_padding()
        self._tok.no_truncation()
        if pad_id is None:
            pad_id = next(
                (
                    self._tok.token_to_id(t)
                    for t in ("[PAD]", "<pad>")
                    if self._tok.token_to_id(t) is not None
                ),
                0,
            )
        self.pad_id = pad_id
        self.max_length = max_length
        if max_length is not None:
            self._tok.enable_truncation(max_length)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Ids of each text (unpadded), encoded in parallel by ``tokenizers``."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def id_to_tokens(self, ids) -> list[str]:
        """The token string of each id (``"<unk>"``-style names for special tokens)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self._tok.id_to_token(int(i)) or f"<{int(i)}>" for i in ids]

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text``, special tokens included."""
        return self._tok.encode(text).tokens

    def encode_batch(
        self, texts: list[str], *, add_special_tokens: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` (1 = real token) and ``token_type_ids``,
        each ``(n, longest)`` int64; and whether any text was truncated is :attr:`truncated`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"Tokenizer.encode_batch: expected a list of str, but got {type(texts).__name__}."
            )
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        self.truncated = [bool(e.overflowing) for e in encs]
        longest = max((len(e.ids) for e in encs), default=0)
        ids = torch.full((len(encs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encs), longest), dtype=torch.long)
        types = torch.zeros((len(encs), longest), dtype=torch.long)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
            types[i, :n] = torch.tensor(e.type_ids, dtype=torch.long)
            mask[i, :n] = 1
        return ids, mask, types

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"
