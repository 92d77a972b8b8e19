"""Hugging Face interop: config.json + safetensors <-> Llama params (Llama, Qwen2, Mistral families).

Import reads one tensor at a time (memory-mapped) and places it straight into its sharding with
`make_array_from_callback`, so the host never holds a second copy of the model. Export gathers one tensor
at a time (`process_allgather` on many hosts) and writes safetensors shards. HF stores linear weights as
[out, in]; ours are [in, out] with heads split out, so each tensor has a fixed transpose/reshape.
The safetensors format (8-byte header size, JSON header, raw little-endian data) is read and written here
with numpy, which also handles bfloat16 without torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from sft_sharded.models.llama import LlamaConfig
from sft_sharded.sharding import global_to_host

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --- safetensors ----------------------------------------------------------------------------------
class SafetensorsDir:
    """Every tensor of `model.safetensors` or of the shards a `model.safetensors.index.json` lists."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = directory / name
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            for key, meta in header.items():
                if key != "__metadata__":
                    self.entries[key] = (path, meta, 8 + size)

    def get(self, name: str) -> np.ndarray:
        if name not in self.entries:
            raise KeyError(f"tensor {name!r} is not in the checkpoint (it has {len(self.entries)} tensors)")
        path, meta, base = self.entries[name]
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        flat = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return flat.view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


# --- config ---------------------------------------------------------------------------------------
def config_from_hf(directory: str | Path, **overrides) -> LlamaConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.path={str(directory)!r}: no config.json in that directory")
    hf = json.loads(path.read_text())
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    # transformers >= 5 writes "rope_parameters" (theta and scaling together); older configs use
    # top-level "rope_theta" and "rope_scaling".
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"{path}: rope_scaling type {kind!r} is not supported (supported: llama3)")
        else:
            scaling = tuple(sorted((k, float(v)) for k, v in scaling.items()
                                   if k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")))
    window = None
    if model_type == "mistral":
        window = hf.get("sliding_window")
    elif hf.get("use_sliding_window"):  # Qwen2 windows only some layers (max_window_layers): not built
        raise ValueError(f"{path}: use_sliding_window=true is not supported for model_type {model_type!r}")
    heads = hf["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, mlp_dim=hf["intermediate_size"],
        head_dim=hf.get("head_dim"), rope_theta=theta,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)), rope_scaling=scaling,
        sliding_window=window, **overrides,
    )


def config_to_hf(cfg: LlamaConfig, model_type: str, dtype: str) -> dict:
    out = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.mlp_dim, "head_dim": cfg.head_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "max_position_embeddings": 4096, "torch_dtype": dtype,
    }
    if model_type == "llama":
        out["attention_bias"] = cfg.qkv_bias
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.sliding_window is not None:
        raise ValueError(f"sliding_window={cfg.sliding_window} can only be exported as model_type 'mistral'")
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
    return out


# --- tensor mapping -------------------------------------------------------------------------------
def _mapping(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[str, Any, Any]]:
    """Our param path (layer index as "{i}") -> (HF name, hf->ours, ours->hf)."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    t = lambda w: w.T  # noqa: E731

    def heads_in(count):
        return lambda w: w.T.reshape(d, count, h), lambda w: w.reshape(d, count * h).T

    layer = "model.layers.{i}."
    m = {
        ("embedding",): ("model.embed_tokens.weight", None, None),
        ("final_norm", "scale"): ("model.norm.weight", None, None),
        ("layer_{i}", "attn", "wq"): (layer + "self_attn.q_proj.weight", *heads_in(n)),
        ("layer_{i}", "attn", "wk"): (layer + "self_attn.k_proj.weight", *heads_in(k)),
        ("layer_{i}", "attn", "wv"): (layer + "self_attn.v_proj.weight", *heads_in(k)),
        ("layer_{i}", "attn", "wo"): (layer + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d),
                                      lambda w: w.reshape(n * h, d).T),
        ("layer_{i}", "mlp", "w_gate"): (layer + "mlp.gate_proj.weight", t, t),
        ("layer_{i}", "mlp", "w_up"): (layer + "mlp.up_proj.weight", t, t),
        ("layer_{i}", "mlp", "w_down"): (layer + "mlp.down_proj.weight", t, t),
        ("layer_{i}", "attn_norm", "scale"): (layer + "input_layernorm.weight", None, None),
        ("layer_{i}", "mlp_norm", "scale"): (layer + "post_attention_layernorm.weight", None, None),
    }
    if cfg.qkv_bias:
        for name, count in (("wq", n), ("wk", k), ("wv", k)):
            m[("layer_{i}", "attn", name + "_bias")] = (
                layer + f"self_attn.{name[1]}_proj.bias", lambda w, c=count: w.reshape(c, h), lambda w: w.reshape(-1))
    if not cfg.tie_embeddings:
        m[("lm_head",)] = ("lm_head.weight", t, t)
    return m


def _entries(cfg: LlamaConfig):
    """(our path, HF name, layer or None, hf->ours, ours->hf) for every tensor."""
    for path, (name, to_ours, to_hf) in _mapping(cfg).items():
        to_ours, to_hf = to_ours or (lambda w: w), to_hf or (lambda w: w)
        if path[0] != "layer_{i}":
            yield path, name, None, to_ours, to_hf
            continue
        for i in range(cfg.num_layers):
            ours = ("layers", *path[1:]) if cfg.scan_layers else (f"layer_{i}", *path[1:])
            yield ours, name.format(i=i), i, to_ours, to_hf


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_params(directory: str | Path, cfg: LlamaConfig, abstract_params: Any) -> Any:
    """Params from an HF directory, each tensor placed straight into the sharding of `abstract_params`."""
    tensors = SafetensorsDir(Path(directory))
    grouped: dict[tuple, list] = {}
    for path, name, layer, to_ours, _ in _entries(cfg):
        grouped.setdefault(path, []).append((name, layer, to_ours))
    params: dict = {}
    for path, parts in grouped.items():
        target = _get(abstract_params, path)

        def read(name, to_ours, shape):
            raw = tensors.get(name)
            try:
                array = to_ours(raw)
            except ValueError:  # a reshape that cannot apply: report it as the shape mismatch it is
                array = raw
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(raw.shape)} in the checkpoint, but the model "
                                 f"expects {tuple(shape)} for {'/'.join(path)} (HF layout: [out, in])")
            return array

        if parts[0][1] is not None and cfg.scan_layers:  # one stacked [layers, ...] array, layer by layer
            host = np.stack([read(name, f, target.shape[1:]) for name, _, f in sorted(parts, key=lambda p: p[1])])
        else:
            (name, _, f), = parts
            host = read(name, f, target.shape)
        host = host.astype(target.dtype)
        _set(params, path, jax.make_array_from_callback(target.shape, target.sharding, lambda idx, a=host: a[idx]))
        del host
    return params


def save_pretrained(params: Any, cfg: LlamaConfig, out_dir: str | Path, *, model_type: str = "llama",
                    dtype: str = "float32", tokenizer_dir: str | Path | None = None,
                    max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json, safetensors (sharded above `max_shard_bytes`) and the tokenizer files.
    Every process must call it (gathers are collective); only process 0 writes."""
    out = Path(out_dir)
    write = jax.process_index() == 0
    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for path, name, layer, _, to_hf in _entries(cfg):
        array = global_to_host(_get(params, path))
        array = to_hf(array[layer] if cfg.scan_layers and layer is not None else array).astype(np_dtype)
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, model_type, dtype), indent=2))
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(out / name, shard)
            weight_map.update({key: name for key in shard})
            total += sum(a.nbytes for a in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out

