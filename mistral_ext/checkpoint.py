"""Checkpoint loading: HF folders (config.json + *.safetensors) and Mistral consolidated folders (params.json +
consolidated.safetensors or consolidated.00.pth), and what every loader shares (gguf_checkpoint.py reads GGUF).

A loader lists its tensors as StoredTensor, not read yet, and ``build_transformer`` checks every name and shape
against the config before reading any, chooses each weight's format (WeightOptions), allocates the model once and
then reads and copies one tensor at a time, so peak memory stays near the final model size plus one tensor.
safetensors files are read with plain reads rather than memory-mapped, because pages of a mapping stay resident
(and counted) until the whole file is unmapped. Nothing is unpickled: .pth files go through
``torch.load(weights_only=True)``. Loaders return data (Loaded); ``mistral_ext.engine.load`` makes the Model.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .args import ModelArgs
from .model import Transformer
from .parallel import Shard, shard_args, shard_ranges
from .quant import BLOCK, GROUP, QuantizedWeight
from .tokenizer import BPETokenizer, Tokenizer

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER_BYTES = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file or tensor and what is wrong."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint file, not read yet: what a loader can decide from its header alone."""

    name: str  # as the file names it
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]  # the values, dequantized when the file quantizes them
    quantized_as: str | None = None  # the format (mistral_ext.quant) a quantized tensor keeps when kept quantized
    read_blocks: Callable[[], QuantizedWeight] | None = None  # when the file's blocks are that format: repacked
    dtype: torch.dtype | None = None  # of a tensor the file stores dense (None: quantized)
    block: int = 1  # values per quantized block along a row: a part of columns starts and ends on a block
    read_part: Callable[[int, int, int], "StoredTensor"] | None = None  # part() reading no more than the part

    def part(self, axis: int, start: int, stop: int) -> "StoredTensor":
        """Rows (axis 0) or columns (axis 1) start:stop of a matrix, as a StoredTensor of its own (a tensor-parallel
        shard); the loader's read_part reads only those, else the tensor is read whole and narrowed (a tensor
        already in memory or memory-mapped)."""
        if self.read_part is not None:
            return self.read_part(axis, start, stop)
        shape = tuple(stop - start if a == axis else n for a, n in enumerate(self.shape))
        return StoredTensor(self.name, shape, lambda: self.read().narrow(axis, start, stop - start).contiguous(),
                            dtype=self.dtype)


@dataclass(frozen=True)
class WeightOptions:
    """How a loader holds the weights."""

    device: torch.device
    dtype: torch.dtype  # activations and norms, and the dense weights unless dense_as_stored
    keep_quantized: bool = False  # tensors the file quantizes stay quantized (else: dequantized to dtype)
    dense_as_stored: bool = False  # dense matrices keep the file's dtype (float64 becomes float32)
    quantize: str | None = None  # the format of matrices the file stores dense (None: they stay dense)
    shard: Shard | None = None  # tensor parallelism: the part of the model this rank holds (mistral_ext.parallel)


@dataclass(frozen=True)
class Loaded:
    """What a loader returns; mistral_ext.engine.load wraps it in a Model."""

    transformer: Transformer
    tokenizer: Tokenizer | BPETokenizer | None
    chat_template: str | None


# ---------------- safetensors ----------------


def read_safetensors(path: Path) -> list[StoredTensor]:
    """The file's tensors, not read yet, after checking the header against the file. Each read is a fresh buffer."""
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
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported or missing field {e}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry: {entry}") from None
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} (shape {list(shape)}, {entry['dtype']}) has data offsets "
                                  f"[{begin}, {end}) that do not fit the file (truncated or corrupt)")
        entries.append((begin, name, dtype, shape, nbytes))

    return [_safetensors_entry(path, name, data_start + begin, dtype, shape)
            for begin, name, dtype, shape, _ in sorted(entries)]


def _safetensors_entry(path: Path, name: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                       columns: tuple[int, int] | None = None) -> StoredTensor:
    """The tensor of `shape` at `offset` of a safetensors file; `columns`: only columns start:stop of each row of
    that matrix, read row by row. Its parts are read alone: a part of rows is a matrix further into the file."""
    size = torch.Size(shape).numel() * dtype.itemsize

    def read() -> torch.Tensor:
        if columns is None:
            buf = torch.empty(size, dtype=torch.uint8)
            with open(path, "rb") as f:
                f.seek(offset)
                if size and f.readinto(buf.numpy()) != size:
                    raise CheckpointError(f"{path}: tensor {name!r} is truncated")
            return buf.view(dtype).reshape(shape)
        (rows, width), (start, stop) = shape, columns
        buf = torch.empty(rows, (stop - start) * dtype.itemsize, dtype=torch.uint8)
        with open(path, "rb") as f:
            for r in range(rows):
                if os.preadv(f.fileno(), [buf[r].numpy()], offset + (r * width + start) * dtype.itemsize) != buf.shape[1]:
                    raise CheckpointError(f"{path}: tensor {name!r} is truncated")
        return buf.view(dtype)

    def read_part(axis: int, start: int, stop: int) -> StoredTensor:
        if columns is not None or len(shape) != 2:
            raise ValueError(f"{path}: tensor {name!r}: only a whole matrix has parts")
        if axis == 0:
            return _safetensors_entry(path, name, offset + start * shape[1] * dtype.itemsize, dtype,
                                      (stop - start, shape[1]))
        return _safetensors_entry(path, name, offset, dtype, shape, (start, stop))

    kept = shape if columns is None else (shape[0], columns[1] - columns[0])
    return StoredTensor(name, kept, read, dtype=dtype, read_part=read_part)


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


# ---------------- the model's weights ----------------


def weight_parts(args: ModelArgs) -> dict[str, list[tuple[str, int]]]:
    """Each weight of the Transformer (its attribute path) -> the checkpoint tensors (mistral-inference names) whose
    rows it holds, in order, with their row counts: wq | wk | wv are fused in wqkv, w1 | w3 in w13."""
    q, kv, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.hidden_dim
    parts = {"tok_embeddings": [("tok_embeddings.weight", args.vocab_size)], "norm": [("norm.weight", args.dim)]}
    if not args.tie_embeddings:
        parts["output"] = [("output.weight", args.vocab_size)]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        parts |= {
            p + "attention.wqkv": [(p + "attention.wq.weight", q), (p + "attention.wk.weight", kv),
                                   (p + "attention.wv.weight", kv)],
            p + "attention.wo": [(p + "attention.wo.weight", args.dim)],
            p + "feed_forward.w13": [(p + "feed_forward.w1.weight", hidden), (p + "feed_forward.w3.weight", hidden)],
            p + "feed_forward.w2": [(p + "feed_forward.w2.weight", args.dim)],
            p + "attention_norm": [(p + "attention_norm.weight", args.dim)],
            p + "ffn_norm": [(p + "ffn_norm.weight", args.dim)],
        }
    return parts


def _owner(model: nn.Module, attr: str) -> tuple[nn.Module, str]:
    path, _, key = attr.rpartition(".")
    return model.get_submodule(path), key


def parameter_slots(model: Transformer) -> dict[str, torch.Tensor | QuantizedWeight]:
    """mistral-inference tensor name -> where the model holds it: a view of a dense weight or a QuantizedWeight
    (rows of the fused wqkv and w13 for wq/wk/wv and w1/w3), or a part of a fused weight kept in parts (an
    nn.ModuleList). Copying into a slot fills the model."""
    slots = {}
    for attr, parts in weight_parts(model.args).items():
        owner, key = _owner(model, attr)
        weight, start = getattr(owner, key), 0
        for i, (name, rows) in enumerate(parts):
            if isinstance(weight, nn.ModuleList):
                slots[name] = weight[i]
            elif isinstance(weight, QuantizedWeight):
                slots[name] = weight.rows(start, start + rows)
            else:
                slots[name] = weight[start : start + rows]
            start += rows
    return slots


def new_transformer(args: ModelArgs, device: torch.device, dtype: torch.dtype,
                    formats: dict[str, str | torch.dtype] | None = None) -> Transformer:
    """Uninitialised weights, allocated once, directly on the device: dense in dtype, except those whose tensors
    `formats` maps (mistral-inference name -> q8_0, q4_0 or q4_1, or a float dtype) to a quantized format or another
    dense dtype. A fused weight is quantized when all its parts are: as one QuantizedWeight when they share a format
    and each part but the last is whole row groups of the layout, else as an nn.ModuleList of its parts (K-quant
    files mix types in wq/wk/wv; keeping each part's own format adds no error and no bytes). It takes another dense
    dtype when all its parts do."""
    formats = formats or {}
    with torch.device("meta"):
        transformer = Transformer(args).to(dtype)
        for attr, parts in weight_parts(args).items():
            wanted = [formats.get(name) for name, _ in parts]
            owner, key = _owner(transformer, attr)
            if all(isinstance(w, torch.dtype) for w in wanted) and len(set(wanted)) == 1:
                shape = getattr(owner, key).shape
                setattr(owner, key, nn.Parameter(torch.empty(shape, dtype=wanted[0]), requires_grad=False))
                continue
            if any(w is None or isinstance(w, torch.dtype) for w in wanted):
                continue
            k = getattr(owner, key).shape[1]
            delattr(owner, key)
            if len(set(wanted)) == 1 and all(rows % GROUP == 0 for _, rows in parts[:-1]):
                weight = QuantizedWeight.empty(sum(rows for _, rows in parts), k, wanted[0])
            else:
                weight = nn.ModuleList(QuantizedWeight.empty(rows, k, fmt) for (_, rows), fmt in zip(parts, wanted))
            setattr(owner, key, weight)
    return transformer.to_empty(device=device)


def _format(stored: StoredTensor, options: WeightOptions) -> str | torch.dtype | None:
    """The format a matrix is held in: a quantized format, a dense dtype other than options.dtype, or None (dense
    in options.dtype)."""
    if stored.quantized_as is not None and options.keep_quantized:
        return stored.quantized_as
    if stored.quantized_as is None and options.quantize and stored.shape[1] % BLOCK == 0:
        return options.quantize
    if options.dense_as_stored and stored.dtype is not None:
        kept = torch.float32 if stored.dtype == torch.float64 else stored.dtype
        return kept if kept != options.dtype else None
    return None


def _floats(stored: StoredTensor, source: str) -> torch.Tensor:
    values = stored.read()
    if not values.is_floating_point():
        raise CheckpointError(f"{source}: tensor {stored.name!r} has dtype {values.dtype}, expected floating point")
    return values


def _fill(slot: torch.Tensor | QuantizedWeight, stored: StoredTensor, source: str, rope_heads: int | None) -> None:
    """Reads one tensor into its slot, in the slot's format; rope_heads: permute the rows of an interleaved-RoPE
    Q/K matrix (whole rows, so quantized blocks, which run along K, stay whole)."""
    if isinstance(slot, QuantizedWeight):
        value = stored.read_blocks() if stored.read_blocks else QuantizedWeight.quantize(_floats(stored, source),
                                                                                          slot.format)
        if rope_heads:
            value = value.permute_rows(lambda t: interleaved_to_half_split(t, rope_heads))
    else:
        value = _floats(stored, source)
        if rope_heads:
            value = interleaved_to_half_split(value, rope_heads)
    with torch.no_grad():
        slot.copy_(value)


def _shard(args: ModelArgs, chosen: dict[str, StoredTensor], shard: Shard,
           source: str) -> tuple[ModelArgs, dict[str, StoredTensor]]:
    """One rank's hyper-parameters and its part of each tensor (mistral_ext.parallel), checked before any is read."""
    try:
        local = shard_args(args, shard.world_size)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    ranges = shard_ranges(args, shard)
    for name, (axis, start, stop) in ranges.items():
        stored = chosen[name]
        if axis == 1 and (stop - start) % stored.block:
            raise CheckpointError(f"{source}: tensor {stored.name!r} cannot be split over {shard.world_size} ranks: "
                                  f"a rank's {stop - start} columns are not whole quantized blocks of {stored.block}")
    return local, {name: stored.part(*ranges[name]) if name in ranges else stored for name, stored in chosen.items()}


def build_transformer(args: ModelArgs, tensors: Iterable[tuple[str | None, StoredTensor]], options: WeightOptions,
                      source: str, interleaved_rope: bool) -> Transformer:
    """The model filled from `tensors`: (mistral-inference name, or None to skip; the stored tensor), or with
    options.shard one rank's part of it. Names, duplicates, shapes and the split are checked before any tensor is
    read; errors use the file's own names."""
    with torch.device("meta"):
        expected = {name: tuple(view.shape) for name, view in parameter_slots(Transformer(args)).items()}
    chosen: dict[str, StoredTensor] = {}
    for name, stored in tensors:
        if name is None or (name == "output.weight" and args.tie_embeddings):
            continue  # tied: some checkpoints store the shared matrix twice
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {stored.name!r} {stored.shape} for this config")
        if name in chosen:
            raise CheckpointError(f"{source}: tensor {stored.name!r} appears twice")
        if stored.shape != expected[name]:
            raise CheckpointError(f"{source}: tensor {stored.name!r} has shape {stored.shape} but the config "
                                  f"expects {expected[name]}")
        chosen[name] = stored
    missing = sorted(set(expected) - set(chosen))
    if missing:
        shown = ", ".join(f"{n} {expected[n]}" for n in missing[:5])
        raise CheckpointError(f"{source}: missing {len(missing)} tensor(s): {shown}{' ...' if len(missing) > 5 else ''}")
    if options.shard is not None:
        args, chosen = _shard(args, chosen, options.shard, source)

    matrices = {name: stored for name, stored in chosen.items() if len(stored.shape) == 2}
    formats = {name: fmt for name, stored in matrices.items() if (fmt := _format(stored, options)) is not None}
    if options.quantize:
        dense = [n for n, stored in matrices.items() if stored.quantized_as is None and stored.shape[1] % BLOCK]
        if dense:
            warnings.warn(f"{source}: {len(dense)} matrices stay dense (their row length K is not a multiple of "
                          f"{BLOCK}): {', '.join(dense[:5])}{' ...' if len(dense) > 5 else ''}")
    transformer = new_transformer(args, options.device, options.dtype, formats)
    slots = parameter_slots(transformer)
    for name, stored in chosen.items():
        rope_heads = None
        if interleaved_rope and name.endswith("attention.wq.weight"):
            rope_heads = args.n_heads
        elif interleaved_rope and name.endswith("attention.wk.weight"):
            rope_heads = args.n_kv_heads
        _fill(slots[name], stored, source, rope_heads)
    return transformer.eval()


# ---------------- folders ----------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def _hf_tensors(folder: Path) -> list[tuple[str | None, StoredTensor]]:
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
    return [(hf_to_consolidated_name(t.name), t) for f in files for t in read_safetensors(folder / f)]


def _consolidated_tensors(folder: Path) -> list[tuple[str | None, StoredTensor]]:
    st = folder / "consolidated.safetensors"
    if st.is_file():
        return [(t.name, t) for t in read_safetensors(st)]
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
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{shards[0]}: entry {name!r} is not a tensor")
    return [(name, tensor_entry(name, tensor)) for name, tensor in state.items()]


def tensor_entry(name: str, tensor: torch.Tensor) -> StoredTensor:
    """A tensor already in memory (or memory-mapped) as a StoredTensor."""
    return StoredTensor(name, tuple(tensor.shape), lambda: tensor, dtype=tensor.dtype)


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


def load_folder(path: str | os.PathLike, options: WeightOptions) -> Loaded:
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
    transformer = build_transformer(args, tensors, options, str(folder), interleaved)
    return Loaded(transformer, *_tokenizer(folder, cfg))
