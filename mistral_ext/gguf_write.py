"""What a GGUF file of the `llama` architecture must say for `gguf_checkpoint.load_gguf` and llama.cpp to read it,
written with the `gguf` package's GGUFWriter: the model's shape from ModelArgs, and the `llama` tokenizer fields of a
sentencepiece model."""

from __future__ import annotations

from pathlib import Path

from .args import ModelArgs


def add_model_metadata(writer, args: ModelArgs) -> None:
    """The hyper-parameters args_from_gguf reads (the writer was made with arch "llama"). Whether the embeddings
    are tied follows from the tensors: a file without output.weight has them tied."""
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.sliding_window is not None:
        writer.add_sliding_window(args.sliding_window)


def sentencepiece_fields(model_path: Path) -> dict:
    """The GGUF `llama` tokenizer fields of a sentencepiece model, by GGUFWriter method (`add_<key>`)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(Path(model_path).read_bytes())
    return {"tokenizer_model": "llama", "token_list": [p.piece for p in m.pieces],
            "token_scores": [p.score for p in m.pieces], "token_types": [int(p.type) for p in m.pieces],
            "bos_token_id": m.trainer_spec.bos_id, "eos_token_id": m.trainer_spec.eos_id,
            "unk_token_id": m.trainer_spec.unk_id}


def add_tokenizer(writer, fields: dict) -> None:
    for key, value in fields.items():
        getattr(writer, f"add_{key}")(value)
