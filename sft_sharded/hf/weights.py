"""Hugging Face interop: safetensors <-> decoder params (the families of `sft_sharded/families/`; config.json
in `hf.config`). A multimodal checkpoint's language model is read and written in place, its towers copied.

Import reads one tensor at a time (memory-mapped) and places it straight into its sharding with
`make_array_from_callback`, so the host never holds a second copy of the model. Export gathers one tensor
at a time (`process_allgather` on many hosts) and writes safetensors shards. HF stores linear weights as
[out, in]; ours are [in, out] with heads split out, so each tensor has a fixed transpose/reshape.
The `safetensors` package writes the files and checks each local file on opening (header, dtypes, offsets
that cover the file: a truncated download is refused by name). Reading stays a numpy memory map of each
tensor's bytes: a device's shard of a transposed tensor then touches only its pages, where the package's
`get_tensor` copies the whole tensor once per device (measured in benchmarks/README.md: 4x the time and
2x the peak memory for a 525 MB tensor in 8 shards); the byte offsets that needs are in the header.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from sft_sharded.rundir import paths
from sft_sharded.errors import MissingFileError, UserError
from sft_sharded.hf.tensor_map import entries, join, unused
from sft_sharded.hf.mxfp4 import Mxfp4
from sft_sharded.families import MULTIMODAL
from sft_sharded.hf.config import (TOKEN_ID_FIELDS, config_from_hf, config_to_hf, hf_model_type, read_hf_config,
                                   text_part, tokenizer_token_ids)
from sft_sharded.models.config import DecoderConfig
from sft_sharded.parallel.sharding import global_to_host

__all__ = ["TOKEN_ID_FIELDS", "config_from_hf", "config_to_hf", "hf_model_type", "load_params", "read_hf_config",
           "save_pretrained", "text_part", "tokenizer_token_ids"]
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64, "U8": np.uint8}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --- safetensors ----------------------------------------------------------------------------------
class SafetensorsDir:
    """Every tensor of `model.safetensors` or of the shards a `model.safetensors.index.json` lists."""

    def __init__(self, directory: str | Path, files: list[str] | None = None, key: str = "model.path",
                 mxfp4: bool = False):
        directory = paths.path(directory, key)
        index = directory / "model.safetensors.index.json"
        if files is not None:
            if not all((directory / f).is_file() for f in files):
                raise MissingFileError(f"{directory}: no {' or '.join(files)}")
        elif index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise MissingFileError(f"model.path={str(directory)!r}: no model.safetensors or "
                                   "model.safetensors.index.json (only safetensors are read, never pickles)")
        self.entries: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise MissingFileError(f"{index}: lists {name}, which is not in {directory}")
            if not paths.is_remote(path):
                try:
                    with safe_open(str(path), framework="numpy"):
                        pass  # opening is the check
                except SafetensorError as err:
                    raise UserError(f"{path}: not a complete safetensors file ({err}; a truncated download?)"
                                    ) from None
            with path.open("rb") as f:
                try:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
                    raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
            for key, meta in header.items():
                if key != "__metadata__":
                    self.entries[key] = (path, meta, 8 + size)
        # A checkpoint quantized with MXFP4 (gpt-oss, `mxfp4`) stores some tensors as `<name>_blocks` and
        # `<name>_scales`: each pair is read as the tensor `<name>`.
        self.packed = {n.removesuffix("_blocks") for n in self.entries if mxfp4 and n.endswith("_blocks")
                       and n.removesuffix("_blocks") + "_scales" in self.entries}

    def get(self, name: str) -> np.ndarray | Mxfp4:
        """The tensor, memory-mapped (or, for a name that `packed` lists, its lazy MXFP4 view)."""
        if name in self.packed:
            return Mxfp4(self.get(name + "_blocks"), self.get(name + "_scales"))
        path, meta, base = self.entries[name]
        if meta["dtype"] not in _DTYPES:
            raise UserError(f"{path}: tensor {name!r} has dtype {meta['dtype']}; readable: {sorted(_DTYPES)}")
        start, end = meta["data_offsets"]
        if paths.is_remote(path):  # one ranged read of this tensor's bytes
            with path.open("rb") as f:
                f.seek(base + start)
                flat = np.frombuffer(f.read(end - start), np.uint8)
        else:
            flat = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
        return flat.view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    # bytes, then one write: save_file would create the file with mode 0600 (unreadable to a serving group),
    # and a bucket takes whole objects anyway; the shard is at most max_shard_bytes
    path.write_bytes(safetensors.numpy.save(tensors))


def get_path(tree, path):
    """The leaf of a nested dict at a tuple of keys."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path, value):
    """Set the leaf of a nested dict at a tuple of keys, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class Source:
    """A checkpoint directory as import and export see it: its config.json, the family of its language
    model, and (read only when asked for: export of a text-only model needs none of it) its tensors, where
    the language model's are (`naming`, for a multimodal checkpoint) and the towers beside them."""

    def __init__(self, directory: str | Path):
        self.directory = paths.path(directory, "model.path")
        self.config = read_hf_config(self.directory)
        self.model_type = text_part(self.config)["model_type"]
        self.multimodal = MULTIMODAL.get(self.config["model_type"])

    @functools.cached_property
    def tensors(self) -> SafetensorsDir:
        quantization = self.config.get("quantization_config") or {}
        return SafetensorsDir(self.directory, mxfp4=quantization.get("quant_method") == "mxfp4")

    @functools.cached_property
    def naming(self) -> tuple[str, str] | None:
        """(prefix, head) of a multimodal checkpoint's language model (`tensor_map.entries`); None otherwise."""
        if self.multimodal is None:
            return None
        names = self.tensors.entries
        found = [p for p in self.multimodal.text_prefixes if f"{p}embed_tokens.weight" in names]
        if not found:
            raise UserError(f"model.path={str(self.directory)!r}: no language model tensors under "
                            f"{list(self.multimodal.text_prefixes)} (a {self.config['model_type']} checkpoint?)")
        heads = [h for h in self.multimodal.heads if h in names] or [self.multimodal.heads[0]]
        return found[0], heads[0]

    @functools.cached_property
    def towers(self) -> list[str]:
        """The tensors beside a multimodal checkpoint's language model, passed through untouched."""
        if self.multimodal is None:
            return []
        return sorted(n for n in self.tensors.entries if n.startswith(self.multimodal.towers))

    def entries(self, cfg: DecoderConfig):
        return entries(cfg, self.model_type, self.naming)


def _check_coverage(source: Source, cfg: DecoderConfig) -> None:
    """Every tensor the model needs is in the checkpoint, and every tensor in the checkpoint is used (a
    multimodal checkpoint's towers pass through).

    Three kinds of extra tensor are known to carry nothing: RoPE's `inv_freq` buffers (older exports; they
    are recomputed from rope_theta), an `lm_head.weight` that equals the embedding of a tied model, and the
    k/v tensors of Gemma 4's KV-sharing layers, which transformers' model drops on load too."""
    directory, tensors = source.directory, source.tensors
    wanted = {name for _, name, _, _, _ in source.entries(cfg)} | set(source.towers)
    stored = set(tensors.entries) | tensors.packed
    stored -= {n + suffix for n in tensors.packed for suffix in ("_blocks", "_scales")}
    missing = sorted(wanted - stored)
    if missing:
        raise UserError(f"model.path={str(directory)!r}: the checkpoint lacks {len(missing)} tensor(s) this "
                        f"config needs: {_listing(missing)} (config.json and the safetensors disagree)")
    prefix = "model." if source.naming is None else source.naming[0]
    dropped = {name for name in stored if name.endswith("rotary_emb.inv_freq")} | {
        prefix + name.removeprefix("model.") for name in unused(cfg)}
    extra = sorted(stored - wanted - dropped)
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        if np.array_equal(tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")):
            extra.remove("lm_head.weight")
        else:
            raise UserError(f"model.path={str(directory)!r}: tie_word_embeddings is true but lm_head.weight differs "
                            "from model.embed_tokens.weight; one of them would be ignored")
    if extra:
        raise UserError(f"model.path={str(directory)!r}: {len(extra)} tensor(s) in the checkpoint are not part of "
                        f"this model and would be ignored: {_listing(extra)}")


def load_params(directory: str | Path, cfg: DecoderConfig, abstract_params: Any) -> Any:
    """Params from an HF directory, straight into the sharding of `abstract_params`: each device's shard is
    assembled from the tensors it covers, read one at a time (memory-mapped), so neither a whole stacked
    param (all layers' or all experts' weights) nor the model is ever on the host at once.

    Refuses a checkpoint with a missing, extra or wrongly shaped tensor, naming it."""
    source = Source(directory)
    tensors = source.tensors
    _check_coverage(source, cfg)
    grouped: dict[tuple, dict] = {}
    for path, name, index, to_ours, _ in source.entries(cfg):
        grouped.setdefault(path, {})[index] = (name, to_ours)
    params: dict = {}
    for path, parts in grouped.items():
        target = get_path(abstract_params, path)
        stacked = len(next(iter(parts)))  # leading axes the tensors are stacked on (layers, experts)

        def read(index, rest, parts=parts, path=path, target=target, stacked=stacked):
            name, to_ours = parts[index]
            raw = tensors.get(name)
            try:
                array = to_ours(raw)
            except ValueError:  # a reshape that cannot apply: report it as the shape mismatch it is
                array = raw
            if array.shape != target.shape[stacked:]:
                raise UserError(f"tensor {name!r} has shape {tuple(raw.shape)} in the checkpoint, but the model "
                                f"expects {target.shape[stacked:]} for {'/'.join(path)} (HF layout: [out, in])")
            return np.asarray(array[rest], target.dtype)

        def shard(idx, read=read, target=target, stacked=stacked):
            ranges = [range(*s.indices(n)) for s, n in zip(idx[:stacked], target.shape[:stacked])]
            blocks = [read(index, idx[stacked:]) for index in itertools.product(*ranges)]
            return np.stack(blocks).reshape(*map(len, ranges), *blocks[0].shape) if stacked else blocks[0]

        set_path(params, path, jax.make_array_from_callback(target.shape, target.sharding, shard))
    return params


def save_pretrained(params: Any, cfg: DecoderConfig, out_dir: str | Path, *, model_type: str | None = None,
                    dtype: str = "float32", tokenizer_dir: str | Path | None = None,
                    token_ids: dict[str, Any] | None = None, generation_config: dict[str, Any] | None = None,
                    source_dir: str | Path | None = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write config.json, generation_config.json, safetensors (sharded above `max_shard_bytes`) and the
    tokenizer files. `model_type` defaults to the family that has exactly this model's tensors; `token_ids`
    (bos/eos/pad) go into config.json, and `generation_config` (default: built from `token_ids`) tells
    transformers' `generate` where to stop. `source_dir` is the checkpoint the model was imported from: what
    its config.json holds that training did not use is written back (`config_to_hf`), and a multimodal
    checkpoint is written whole, its towers copied byte for byte. Every process must call it (gathers are
    collective); only process 0 writes."""
    out = paths.path(out_dir, "export target")
    source = Source(source_dir) if source_dir is not None else None
    model_type = hf_model_type(cfg, source.model_type if source else model_type)
    config = config_to_hf(cfg, model_type, dtype, token_ids, source.config if source else None)
    write = jax.process_index() == 0
    shards = _shards(params, cfg, model_type, np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype),
                     max_shard_bytes, source, towers=write)
    if not write:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if generation_config is None:
        generation_config = {k: v for k, v in (token_ids or {}).items() if v is not None}
    if generation_config:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    _write_weights(out, shards)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            tokenizer_file = paths.path(tokenizer_dir, "tokenizer.path") / name
            if tokenizer_file.is_file():
                (out / name).write_bytes(tokenizer_file.read_bytes())
    return out


def _shards(params: Any, cfg: DecoderConfig, model_type: str, np_dtype: np.dtype, max_shard_bytes: int,
            source: Source | None, towers: bool) -> list[dict[str, np.ndarray]]:
    """Every HF tensor of the export on this host, in shards of at most `max_shard_bytes` (gathered one
    param at a time), then (with `towers`) `source`'s towers as stored (same dtype, same bytes)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]

    def add(name: str, array: np.ndarray) -> None:
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = np.require(array, requirements="C")  # ascontiguousarray would make a scalar [1]
        sizes[-1] += array.nbytes

    items = list(entries(cfg, model_type, source.naming if source else None))
    gathered: tuple = (None, None)  # one stacked param on the host at a time
    # A tensor made of several of ours (Phi-3's qkv_proj) is written once all of its parts are here.
    count = collections.Counter(name for _, name, *_ in items)
    pending: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for path, name, index, _, to_hf in items:
        if gathered[0] != path:
            gathered = (path, global_to_host(get_path(params, path)))
        pending[name].append(to_hf(gathered[1][index]).astype(np_dtype))
        if len(pending[name]) == count[name]:
            add(name, join(model_type, name, pending.pop(name)))
    for name in source.towers if source and towers else ():
        add(name, np.array(source.tensors.get(name)))
    return shards


def _write_weights(out: Path, shards: list[dict[str, np.ndarray]]) -> None:
    """model.safetensors, or numbered shards and their model.safetensors.index.json."""
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / name, shard)
        weight_map.update({key: name for key in shard})
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
