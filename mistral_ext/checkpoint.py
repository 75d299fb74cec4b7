"""Checkpoint loading: HF folders (config.json + *.safetensors) and Mistral consolidated folders (params.json +
consolidated.safetensors or consolidated.00.pth).

Tensors stream one at a time into the model's preallocated (fused) parameters, so peak memory stays near the
final model size. safetensors files are read with plain reads rather than memory-mapped, because pages of a
mapping stay resident (and counted) until the whole file is unmapped. Nothing is unpickled: .pth files go through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .args import ModelArgs
from .model import Transformer
from .tokenizer import BPETokenizer, Tokenizer

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or tensor and what is wrong."""


# ---------------- safetensors ----------------


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one at a time, checking the header against the file before any tensor is read.
    Each tensor is only valid until the next is yielded: copy what you keep."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {header_len} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        data_start, data_size = 8 + header_len, size - 8 - header_len
        entries = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = [int(n) for n in entry["shape"]]
                begin, end = (int(n) for n in entry["data_offsets"])
            except KeyError as e:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported or missing field {e}") from None
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry: {entry}") from None
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} (shape {shape}, {entry['dtype']}) has data offsets "
                                      f"[{begin}, {end}) that do not fit the file (truncated or corrupt)")
            entries.append((begin, name, dtype, shape, nbytes))
        # One read buffer, reused: each yielded tensor is a view of it, valid until the next one is read.
        scratch = torch.empty(max((e[4] for e in entries), default=0), dtype=torch.uint8)
        for begin, name, dtype, shape, nbytes in sorted(entries):
            buf = scratch[:nbytes]
            f.seek(data_start + begin)
            if nbytes and f.readinto(buf.numpy()) != nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} is truncated")
            yield name, buf.view(dtype).reshape(shape)


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of read_safetensors (used to make test and benchmark checkpoints without extra packages)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


# ---------------- configs ----------------


def _refuse(what: str, source: str) -> None:
    raise CheckpointError(f"{source}: {what} is not supported")


def args_from_hf_config(cfg: dict, source: str) -> ModelArgs:
    model_type = cfg.get("model_type")
    if model_type not in ("mistral", "llama"):
        _refuse(f"model_type {model_type!r} (supported: mistral, llama)", source)
    if cfg.get("rope_scaling"):
        _refuse(f"rope_scaling {cfg['rope_scaling']}", source)
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        _refuse(f"rope_parameters.rope_type {rope['rope_type']!r}", source)
    if cfg.get("hidden_act", "silu") != "silu":
        _refuse(f"hidden_act {cfg['hidden_act']!r}", source)
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            _refuse(flag, source)
    try:
        heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") if model_type == "mistral" else None
        return ModelArgs(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, hidden_dim=cfg["intermediate_size"],
            n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 1e4)),
            sliding_window=window, max_seq_len=cfg.get("max_position_embeddings", 8192),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def args_from_params(params: dict, source: str) -> ModelArgs:
    for feature in ("moe", "lora", "vision_encoder", "rope_scaling", "quantization"):
        if params.get(feature):
            _refuse(feature, source)
    try:
        return ModelArgs(
            dim=params["dim"], n_layers=params["n_layers"], head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
            hidden_dim=params["hidden_dim"], n_heads=params["n_heads"], n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=params["vocab_size"], norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 1e4), sliding_window=params.get("sliding_window"),
            max_seq_len=params.get("max_seq_len", params.get("max_position_embeddings", 8192)),
            tie_embeddings=bool(params.get("tied_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"{source}: missing {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---------------- tensor names ----------------

HF_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}


def hf_to_consolidated_name(name: str) -> str | None:
    """HF name -> mistral-inference name; None for buffers that carry no weights."""
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    if name.endswith("rotary_emb.inv_freq"):
        return None
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_LAYER_NAMES:
        return f"layers.{parts[2]}.{HF_LAYER_NAMES[parts[3]]}"
    return name  # reported as unexpected by the loader


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Q/K rows of a checkpoint in the interleaved RoPE convention (pairs 2i, 2i+1) to the half-split convention
    (pairs i, i + D/2) that the kernels use: HF's conversion permutation."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def parameter_slots(model: Transformer) -> dict[str, torch.Tensor]:
    """mistral-inference tensor name -> the view of the model's parameter that holds it (rows of the fused wqkv
    and w13 for wq/wk/wv and w1/w3). Copying into a view fills the parameter."""
    a = model.args
    q, kv, hidden = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.hidden_dim
    slots = {"tok_embeddings.weight": model.tok_embeddings, "norm.weight": model.norm}
    if model.output is not None:
        slots["output.weight"] = model.output
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        att, ff = layer.attention, layer.feed_forward
        slots |= {
            p + "attention.wq.weight": att.wqkv[:q],
            p + "attention.wk.weight": att.wqkv[q : q + kv],
            p + "attention.wv.weight": att.wqkv[q + kv :],
            p + "attention.wo.weight": att.wo,
            p + "feed_forward.w1.weight": ff.w13[:hidden],
            p + "feed_forward.w3.weight": ff.w13[hidden:],
            p + "feed_forward.w2.weight": ff.w2,
            p + "attention_norm.weight": layer.attention_norm,
            p + "ffn_norm.weight": layer.ffn_norm,
        }
    return slots


def fill_parameters(model: Transformer, tensors: Iterator[tuple[str | None, str, torch.Tensor]], source: str,
                    interleaved_rope: bool) -> None:
    """Copies each tensor, given as (mistral-inference name or None to skip, name in the file, tensor), into its
    slot (converting dtype and device), checking names and shapes. Errors use the file's own names."""
    slots = parameter_slots(model)
    seen: set[str] = set()
    a = model.args
    for name, file_name, tensor in tensors:
        if name is None:
            continue
        if name == "output.weight" and a.tie_embeddings:
            continue  # tied: some checkpoints store the shared matrix twice
        if name not in slots:
            raise CheckpointError(f"{source}: unexpected tensor {file_name!r} {tuple(tensor.shape)} for this config")
        if name in seen:
            raise CheckpointError(f"{source}: tensor {file_name!r} appears twice")
        target = slots[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: tensor {file_name!r} has shape {tuple(tensor.shape)} but the config "
                                  f"expects {tuple(target.shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {file_name!r} has dtype {tensor.dtype}, expected floating point")
        if interleaved_rope and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            tensor = interleaved_to_half_split(tensor, a.n_heads if name.endswith("wq.weight") else a.n_kv_heads)
        with torch.no_grad():
            target.copy_(tensor)
        seen.add(name)
    missing = sorted(set(slots) - seen)
    if missing:
        shown = ", ".join(f"{n} {tuple(slots[n].shape)}" for n in missing[:5])
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {shown}{' ...' if len(missing) > 5 else ''}")


# ---------------- folders ----------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _hf_tensors(folder: Path) -> Iterator[tuple[str | None, str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
        for f in files:
            if not (folder / f).is_file():
                raise CheckpointError(f"{index}: shard {f} is missing")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    for f in files:
        for name, tensor in read_safetensors(folder / f):
            yield hf_to_consolidated_name(name), name, tensor


def _consolidated_tensors(folder: Path) -> Iterator[tuple[str | None, str, torch.Tensor]]:
    st = folder / "consolidated.safetensors"
    if st.is_file():
        for name, tensor in read_safetensors(st):
            yield name, name, tensor
        return
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise CheckpointError(f"{folder}: expected consolidated.safetensors or one consolidated.00.pth, "
                              f"found {[p.name for p in shards]}")
    try:
        state = torch.load(shards[0], map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers
        raise CheckpointError(f"{shards[0]}: cannot be read as a weights-only checkpoint: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{shards[0]}: expected a dict of tensors, got {type(state).__name__}")
    for name in list(state):
        tensor = state.pop(name)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{shards[0]}: entry {name!r} is not a tensor")
        yield name, name, tensor


def _tokenizer(folder: Path, config: dict) -> tuple[Tokenizer | BPETokenizer | None, str | None]:
    """The folder's tokenizer (tokenizer.model, else tokenizer.json) and its chat template, if any."""
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    eos = config.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else eos
    template = tok_config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        template = (folder / "chat_template.jinja").read_text()
    template = template if isinstance(template, str) else None
    for name in ("tokenizer.model", "tokenizer.model.v1", "tokenizer.model.v3"):
        if (folder / name).is_file():
            return Tokenizer(folder / name, add_bos=bool(tok_config.get("add_bos_token", True)), eos_ids=eos_ids), template
    if (folder / "tokenizer.json").is_file():
        tok = BPETokenizer.from_file(folder / "tokenizer.json", add_bos=bool(tok_config.get("add_bos_token", False)),
                                     bos_id=config.get("bos_token_id"), eos_ids=eos_ids)
        return tok, template
    return None, None


def new_transformer(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> Transformer:
    """Uninitialised parameters, allocated once, directly in the target dtype and device."""
    with torch.device("meta"):
        transformer = Transformer(args).to(dtype)
    return transformer.to_empty(device=device)


def load_folder(path: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    from .engine import Model

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder (config.json or params.json inside)")
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        args = args_from_hf_config(cfg, str(folder / "config.json"))
        tensors, interleaved = _hf_tensors(folder), False
    elif (folder / "params.json").is_file():
        args = args_from_params(_read_json(folder / "params.json"), str(folder / "params.json"))
        tensors, interleaved, cfg = _consolidated_tensors(folder), True, {}
    else:
        raise CheckpointError(f"{folder}: neither config.json (HF) nor params.json (Mistral consolidated) found")
    transformer = new_transformer(args, device, dtype)
    fill_parameters(transformer, tensors, str(folder), interleaved)
    tokenizer, template = _tokenizer(folder, cfg)
    model = Model(transformer.eval(), tokenizer)
    model.chat_template = template
    return model
