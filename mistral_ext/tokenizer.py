"""Tokenizers and incremental detokenization."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """A sentencepiece ``tokenizer.model`` (Mistral and Llama 1/2 vocabularies)."""

    def __init__(self, path: str | Path, add_bos: bool = True, eos_ids: list[int] | None = None):
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from None
        self.path = path
        self.add_bos = add_bos
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id()
        self.eos_ids = list(eos_ids) if eos_ids else [self._sp.eos_id()]

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._sp.EncodeAsIds(text)
        if (self.add_bos if bos is None else bos) and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Decoding a suffix alone loses sentencepiece's leading space and may end inside a multi-byte character, so each
    step decodes from a few tokens back (prefix_offset) and emits only what is new and complete (no U+FFFD at the
    end), as vLLM's detokenizer does. Work per token stays constant however long the text grows.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if text.endswith("\ufffd") or len(text) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end), once no token will follow."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""
