"""Tokenizers and incremental detokenization."""

from __future__ import annotations

from pathlib import Path


class _Encoder:
    """encode() shared by the tokenizers: text to ids, with BOS by the checkpoint's convention unless told."""

    add_bos: bool
    bos_id: int

    def _ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = self._ids(text)
        if (self.add_bos if bos is None else bos) and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        return ids


class Tokenizer(_Encoder):
    """A sentencepiece ``tokenizer.model`` (Mistral and Llama 1/2 vocabularies)."""

    def __init__(self, path: str | Path | None = None, add_bos: bool = True, eos_ids: list[int] | None = None,
                 proto: bytes | None = None):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        if proto is not None:
            self._sp.LoadFromSerializedProto(proto)
        else:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer file not found: {path}")
            try:
                self._sp.Load(str(path))
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from None
        self.add_bos = add_bos
        self.vocab_size = self._sp.GetPieceSize()
        self.bos_id = self._sp.bos_id()
        self.eos_ids = list(eos_ids) if eos_ids else [self._sp.eos_id()]

    @classmethod
    def from_pieces(cls, pieces: list[str], scores: list[float], types: list[int], add_bos: bool,
                    eos_ids: list[int] | None, bos_id: int | None, add_space_prefix: bool = True) -> "Tokenizer":
        """From a vocabulary listing (GGUF `llama` tokenizers): pieces, scores and sentencepiece piece types."""
        eos = eos_ids[0] if eos_ids else None
        return cls(proto=_from_pieces_proto(pieces, scores, types, bos_id, eos, add_space_prefix), add_bos=add_bos,
                   eos_ids=eos_ids)

    def _ids(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))


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


def _from_pieces_proto(pieces, scores, types, bos_id, eos_id, add_space_prefix: bool) -> bytes:
    """A sentencepiece BPE model built from a vocabulary listing (as GGUF stores it)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = any(t == 6 for t in types)
    unknown = [i for i, t in enumerate(types) if t == 2]
    m.trainer_spec.unk_id = unknown[0] if unknown else 0
    m.trainer_spec.bos_id = -1 if bos_id is None else int(bos_id)
    m.trainer_spec.eos_id = -1 if eos_id is None else int(eos_id)
    m.trainer_spec.pad_id = -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = add_space_prefix
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for piece, score, kind in zip(pieces, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind)
    return m.SerializeToString()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte as a printable character, as byte-level BPE vocabularies spell tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class BPETokenizer(_Encoder):
    """Byte-level BPE (GPT-2 style) through the `tokenizers` library: GGUF `gpt2` vocabularies and tokenizer.json."""

    def __init__(self, backend, add_bos: bool, bos_id: int | None, eos_ids: list[int]):
        self._tok = backend
        self.add_bos = add_bos
        self.bos_id = -1 if bos_id is None else int(bos_id)
        self.eos_ids = list(eos_ids)
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_vocab(cls, tokens: list[str], merges: list[str], types: list[int], add_bos: bool, bos_id: int | None,
                   eos_ids: list[int] | None) -> "BPETokenizer":
        from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

        alphabet = set(bytes_to_unicode().values())
        spell = bytes_to_unicode()
        vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                   if k == 3 and set(t) <= alphabet]
        backend.add_special_tokens(control)
        backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])
        return cls(backend, add_bos, bos_id, eos_ids or [])

    @classmethod
    def from_file(cls, path: Path, add_bos: bool, bos_id: int | None, eos_ids: list[int] | None) -> "BPETokenizer":
        """An HF tokenizer.json."""
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the library raises its own exception type
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls(backend, add_bos, bos_id, eos_ids or [])

    def _ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))
