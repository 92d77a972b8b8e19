"""Typed, frozen run configuration; `load_config(yaml, ["a.b=1", ...])` with checks that name the key.

This module does not import jax: the CLI reads the config first, then sets up simulated devices.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sft_sharded.rundir import paths
from sft_sharded.choices import (ATTENTION_IMPLEMENTATIONS, CONTEXT_SCHEMES, DEFAULT_CONTEXT_SCHEME, LORA_BASE_DTYPES,
                                 LORA_TARGETS, PEFT_TARGETS, REMAT_POLICIES)
from sft_sharded.errors import MissingFileError, UserError


class ConfigError(UserError):
    """A config key that does not exist or a value it does not take; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Sizes of the mesh axes; one may be -1. Checked, and -1 resolved, by `sharding.mesh_shape` against
    the devices once jax is up. The fields up to `tensor` are the mesh's axes, in the mesh's order
    (`sharding.MESH_AXES` is read from them); `slices` and `dcn_axis` say how the mesh lies over slices."""

    data: int = 2
    fsdp: int = 2
    expert: int = 1  # expert parallelism: a mixture's experts split between this many groups
    context: int = 1  # context parallelism: each row's positions split between this many devices
    tensor: int = 2
    # TPU slices joined over the data-centre network (DCN); without slice ids (CPU, GPU) each process stands
    # in for one. Only `dcn_axis` spans them: its size is a multiple of `slices`, every other axis stays
    # inside one slice. "data" crosses DCN once per step (the gradient's all-reduce); "fsdp" also gathers
    # every layer's weights over DCN in the forward and backward passes, for a model whose state does not
    # fit in one slice.
    slices: int = dataclasses.field(default=1, metadata={"layout": True})
    dcn_axis: Literal["data", "fsdp"] = dataclasses.field(default="data", metadata={"layout": True})

    def __post_init__(self):
        if not isinstance(self.slices, int) or self.slices < 1:
            raise ConfigError(f"mesh.slices={self.slices!r} must be an int >= 1")

    def axis_sizes(self) -> dict[str, int]:
        """{axis: size} of the mesh's axes (not the slice layout)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("layout")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model: `preset` or `path`, and options that are DecoderConfig fields of the same name."""

    preset: str = "tiny"
    path: str | None = None  # a Hugging Face directory (config.json + safetensors); overrides preset
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Literal[REMAT_POLICIES] = "none"  # type: ignore[valid-type]
    scan_layers: bool = False
    attention: Literal[ATTENTION_IMPLEMENTATIONS] = "auto"  # type: ignore[valid-type]
    # With mesh.context > 1: "ring" (key/value blocks pass around the devices) or "allgather" (every device
    # gathers the row's keys and values).
    context_attention: Literal[CONTEXT_SCHEMES] = DEFAULT_CONTEXT_SCHEME  # type: ignore[valid-type]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    # JSONL/Parquet/Arrow file, glob, dataset directory (datasets.save_to_disk, or a Hub-style repository
    # with data/train-*.parquet), hf://datasets/NAME from the local Hugging Face cache, or a list of them;
    # None: the built-in task.
    path: str | list[str] | None = None
    eval_path: str | list[str] | None = None  # held-out data, as data.path (the built-in task has its own split)
    split: str = "train"  # the split of dataset directories in data.path
    eval_split: str = "test"  # the split of dataset directories in data.eval_path
    weights: list[float] | None = None  # per-file mixture weights for data.path
    # Other datasets' column names -> ours, e.g. {conversations: messages, from: role, value: content}
    # (ShareGPT; its speaker names human/gpt become user/assistant). Keys inside messages are renamed too.
    columns: dict[str, str] | None = None
    format: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    task: Literal["reverse", "sort", "mixed"] = "mixed"  # the built-in task
    train_on_prompt: bool = False  # False: loss on completions / assistant turns only
    # Chats whose template rewrites earlier turns (Qwen3 drops their reasoning). "last": one example, the
    # conversation as the template renders it whole (earlier answers without reasoning, the last turn with
    # it: TRL's and Qwen's rule). "per_turn": one example per assistant turn, rendered up to that turn and
    # training only it, so every turn's reasoning is trained.
    multi_turn_reasoning: Literal["last", "per_turn"] = "last"
    max_length: int = 128  # positions per row
    truncation: Literal["truncate", "drop"] = "truncate"  # for examples longer than max_length
    packing: bool = True
    pack_buffer: int = 256  # examples packed together (best fit decreasing)
    pad_to_multiple_of: int = 8  # unpacked mode: rows padded to the batch's longest, rounded up
    batch_size: int = 16  # global, in rows
    num_eval: int = 256  # held-out examples of the built-in task
    # Records read and checked before anything compiles (the start-of-run data report; a malformed record
    # among them stops the run there, not hours in); -1: all of them, for a long run on a dataset of mixed
    # origin. The rest are checked when the run reaches them.
    check_records: int = 10_000
    worker_count: int = 0  # grain worker processes for tokenization (0: in the main process)
    # How processes split the data. "records": each reads and packs only its share of the records (scales
    # to any number of hosts; the batches then depend on the process count). "rows": each builds the same
    # global stream and keeps its rows of every batch (batches and data checkpoints independent of the
    # process count, at the price of every process tokenizing everything: for a few hosts).
    shard_by: Literal["records", "rows"] = "records"

    def __post_init__(self):
        for key in ("max_length", "batch_size", "num_eval", "pack_buffer", "pad_to_multiple_of"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.worker_count < 0:
            raise ConfigError(f"data.worker_count={self.worker_count} must be >= 0")
        if self.check_records < 1 and self.check_records != -1:
            raise ConfigError(f"data.check_records={self.check_records} must be >= 1, or -1 for all records")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    path: str | None = None  # a directory with tokenizer.json (+ tokenizer_config.json); None: bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 3e-3
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.1  # final lr = lr * end_lr_ratio
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ConfigError(f"optim.end_lr_ratio={self.end_lr_ratio} must be in [0, 1]")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"optim.clip_norm={self.clip_norm} must be > 0 or null")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optim.grad_accum_steps={self.grad_accum_steps} must be >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 100  # steps between held-out loss/accuracy evaluations (0: only at the end)
    num_generate: int = 256  # held-out records scored by greedy generation (exact match, eval/step_N.jsonl)
    # when to generate: with every held-out evaluation, or at the end of the run only (generation is the
    # slow part of an evaluation: num_generate x max_new_tokens decoding steps)
    generate: Literal["each_eval", "end"] = "each_eval"
    max_new_tokens: int = 16


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    # Positions per chunk of a cross entropy that never holds [B, T, V] logits; 0: full logits; null: 1024
    # for vocabularies of 200k and more (Gemma), full logits otherwise (models/presets.loss_chunk).
    chunk_size: int | None = None
    z_loss: float = 0.0

    def __post_init__(self):
        if self.chunk_size is not None and self.chunk_size < 0:
            raise ConfigError(f"loss.chunk_size={self.chunk_size} must be >= 0 (0: full logits) or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    enabled: bool = False  # needs `pip install 'sft_sharded[wandb]'`
    project: str = "sft_sharded"
    entity: str | None = None
    name: str | None = None  # the run's display name (default: W&B's)
    # offline: written under run_dir/wandb for `wandb sync`; disabled: no W&B run. null: W&B's own WANDB_MODE
    # (offline and dryrun: offline; disabled: off), online when that is unset
    mode: Literal["online", "offline", "disabled"] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    enabled: bool = False  # needs `pip install 'sft_sharded[mlflow]'`
    tracking_uri: str | None = None  # default: MLflow's own ($MLFLOW_TRACKING_URI)
    experiment: str = "sft_sharded"
    name: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackConfig:
    """Trackers beside metrics.jsonl and TensorBoard (process 0 logs; a resumed run continues its run)."""

    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)
    mlflow: MlflowConfig = dataclasses.field(default_factory=MlflowConfig)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """LoRA: adapters on the projections in `targets` train, the base is frozen (`models/lora.py`). One type
    for the run's `lora` section and the model's `DecoderConfig.lora` (which holds None where rank is 0)."""

    rank: int = 0  # 0: full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input while training (as PEFT's lora_dropout)
    targets: tuple[str, ...] = LORA_TARGETS  # our names; PEFT's ("q_proj", ...) are accepted too
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    base_dtype: Literal[LORA_BASE_DTYPES] = "bfloat16"  # type: ignore[valid-type]  # the frozen base's storage
    init_from: str | None = None  # a PEFT adapter directory to continue training from

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ConfigError(f"lora.rank={self.rank!r} must be an int >= 0 (0: off)")
        ours = {peft: name for name, peft in PEFT_TARGETS.items()}
        names = tuple(dict.fromkeys(ours.get(t, t) for t in self.targets))
        unknown = [t for t in names if t not in LORA_TARGETS]
        if unknown or not names:
            raise ConfigError(f"lora.targets={list(self.targets)}: unknown {unknown}; choose from "
                              f"{list(LORA_TARGETS)} or {list(PEFT_TARGETS.values())}")
        object.__setattr__(self, "targets", names)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if self.base_dtype not in LORA_BASE_DTYPES:
            raise ConfigError(f"lora.base_dtype={self.base_dtype!r} must be one of {list(LORA_BASE_DTYPES)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = 100  # steps between saves (0: only on SIGTERM)
    keep: int = 3  # newest checkpoints kept
    keep_every: int | None = None  # also keep every N-th step for good
    async_save: bool = True

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 0 and checkpoint.keep={self.keep} >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 400
    seed: int = 0
    simulate_devices: int = 8  # CPU only: simulated devices set up before jax starts (0: leave as is)
    log_every: int = 20
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    track: TrackConfig = dataclasses.field(default_factory=TrackConfig)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} must be >= 1")
        if self.log_every < 1:
            raise ConfigError(f"log_every={self.log_every} must be >= 1")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints widen to floats. Errors name the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} must be one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, inner)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(" or ".join(errors))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {_coerce(f"{key} key", k, args[0]): _coerce(f"{key}[{k!r}]", v, args[1]) for k, v in value.items()}
    if origin in (list, tuple):  # a tuple field (hashable, for the model's config) is a list in YAML
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        return origin(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}={value!r} must be of type {hint.__name__}, got {type(value).__name__}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (keys here: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a mapping, got {value!r}")
            kwargs[key] = _build(hints[key], value, path + ".")
        else:
            kwargs[key] = _coerce(path, value, hints[key])
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    tree[leaf] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column) and what (PyYAML's own message spans lines)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}not valid YAML: {getattr(err, 'problem', None) or err}".replace("\n", " ")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from defaults, then a YAML file, then `KEY=VALUE` overrides (values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path is not None:
        if not paths.path(path, "--config").is_file():
            raise MissingFileError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(paths.path(path).read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: {_yaml_problem(err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        values = loaded or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"{key.strip()}={raw!r}: the value {_yaml_problem(err)}") from None
        _set_dotted(values, key.strip(), value)
    return _build(TrainConfig, values, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    paths.path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
