"""LoRA adapters <-> Hugging Face PEFT (`adapter_config.json` + `adapter_model.safetensors`), and the
merge of adapters into base weights (W + scale * A B) for a plain transformers export.

PEFT stores `lora_A.weight` as [r, in] and `lora_B.weight` as [out, r] for each adapted `nn.Linear`;
ours are A [*in, r] and B [r, *out] with heads split out, so each is a reshape and a transpose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sft_sharded.rundir import paths
from sft_sharded.choices import PEFT_TARGETS, PROJECTIONS
from sft_sharded.errors import MissingFileError, UserError
from sft_sharded.hf.weights import SafetensorsDir, get_path, set_path, write_safetensors
from sft_sharded.models.config import DecoderConfig
from sft_sharded.parallel.sharding import global_to_host

_PREFIX = "base_model.model.model.layers.{i}."


def _entries(cfg: DecoderConfig):
    """(our path, PEFT name, layer, which: "a" or "b", target) for every adapter tensor (a Gemma 4 layer
    that shares another's keys and values has no k and v to adapt)."""
    for target in cfg.lora.targets:
        for which, peft in (("a", "lora_A"), ("b", "lora_B")):
            parent, _, module = PROJECTIONS[target]
            for i in range(cfg.num_layers):
                if target not in cfg.projections(i):
                    continue
                layer = cfg.layer_name(i)
                name = _PREFIX.format(i=i) + f"{module}.{peft}.weight"
                yield (layer, parent, f"{target}_lora_{which}"), name, i, which, target


def _to_peft(array: np.ndarray, which: str, rank: int) -> np.ndarray:
    return array.reshape(-1, rank).T if which == "a" else array.reshape(rank, -1).T


def save_adapter(adapters: Any, cfg: DecoderConfig, out_dir: str | Path, base_model: str) -> Path:
    """Write a PEFT LoRA adapter that `peft.PeftModel.from_pretrained(base, out_dir)` loads. Every process
    must call it (gathers are collective); only process 0 writes."""
    lora, out = cfg.lora, paths.path(out_dir, "export target")
    tensors = {}
    for path, name, layer, which, _ in _entries(cfg):
        array = global_to_host(get_path(adapters, path))
        array = array[layer] if cfg.scan_layers else array
        tensors[name] = np.ascontiguousarray(_to_peft(array, which, lora.rank).astype(np.float32))
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "use_rslora": lora.rslora,
              "target_modules": sorted(PEFT_TARGETS[t] for t in lora.targets), "bias": "none",
              "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None, "use_dora": False}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_adapters(directory: str | Path, cfg: DecoderConfig, abstract_adapters: Any) -> Any:
    """Adapters from a PEFT directory, each placed into its sharding; the adapter must match the run's
    lora settings (rank, alpha, targets), and every tensor must be used."""
    directory = paths.path(directory, "lora.init_from")
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise MissingFileError(f"lora.init_from={str(directory)!r}: no adapter_config.json in that directory")
    saved = json.loads(path.read_text())
    lora = cfg.lora
    targets = sorted(PEFT_TARGETS[t] for t in lora.targets)
    want = {"peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.rslora,
            "target_modules": targets}
    got = {**saved, "target_modules": sorted(saved.get("target_modules") or []),
           "use_rslora": saved.get("use_rslora", False)}
    differ = [f"{k}={got.get(k)!r} (this run: {v!r})" for k, v in want.items() if got.get(k) != v]
    if differ:
        raise UserError(f"{path}: the adapter does not match the lora settings: {', '.join(differ)}")
    tensors = SafetensorsDir(directory, files=["adapter_model.safetensors"], key="lora.init_from")
    entries = list(_entries(cfg))
    extra = sorted(set(tensors.entries) - {name for _, name, _, _, _ in entries})
    if extra:
        raise UserError(f"{directory}: adapter tensors this model does not have: {extra[:4]}")
    grouped: dict[tuple, list] = {}
    for our, name, layer, which, _ in entries:
        grouped.setdefault(our, []).append((layer, name, which))
    out: dict = {}
    for our, parts in grouped.items():
        target = get_path(abstract_adapters, our)
        shape = target.shape[1:] if cfg.scan_layers else target.shape
        arrays = []
        for _, name, which in sorted(parts):
            if name not in tensors.entries:
                raise UserError(f"{directory}: the adapter lacks {name!r}")
            raw = np.asarray(tensors.get(name))
            arrays.append(raw.T.reshape(shape))
        host = (np.stack(arrays) if cfg.scan_layers else arrays[0]).astype(target.dtype)
        set_path(out, our, jax.make_array_from_callback(target.shape, target.sharding, lambda idx, a=host: a[idx]))
    return out


def merge(base: Any, adapters: Any, cfg: DecoderConfig) -> Any:
    """Base params with every adapted weight replaced by W + scale * A B, in float32."""
    merged = jax.tree.map(lambda x: x, base)
    scale = cfg.lora.scale
    for target in cfg.lora.targets:
        for i in range(1 if cfg.scan_layers else cfg.num_layers):
            if target not in cfg.projections(i):
                continue
            module, weight, _ = PROJECTIONS[target]
            parent = (cfg.layer_name(i), module)
            a = get_path(adapters, (*parent, f"{target}_lora_a")).astype(jnp.float32)
            b = get_path(adapters, (*parent, f"{target}_lora_b")).astype(jnp.float32)
            product = jax.vmap(lambda x, y: jnp.tensordot(x, y, 1))(a, b) if cfg.scan_layers else jnp.tensordot(a, b, 1)
            w = get_path(merged, (*parent, weight))
            set_path(merged, (*parent, weight), w.astype(jnp.float32) + scale * product)
    return merged
