"""Typed, validated, frozen experiment configuration.

One `Config` holds four sections (`model`, `data`, `train`, `parallel`). Defaults live here and only here,
each field with a one-line reason or unit. A YAML file overrides defaults, `--set section.key=value` overrides
the file; unknown keys are errors that suggest the nearest valid key. `Config.validate()` checks consistency once
at start; after that the config is frozen and passed explicitly.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, get_type_hints

import yaml

from jaxctx.errors import ConfigError  # noqa: F401  (re-exported: callers catch jaxctx.config.ConfigError)

FAMILIES = ("gpt2", "llama", "bert")
ATTENTION_IMPLS = ("auto", "reference", "xla", "blockwise", "cudnn", "pallas_gpu", "splash")
CONTEXT_PARALLEL = ("ring", "all_gather")  # strategies of jaxctx.ops.ring over the `sequence` mesh axis
DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("lm", "sequence_classification", "token_classification")  # model.task: jaxctx.models.heads
# data.task for each task model: the labelled-data format its batches need (jaxctx.data.task)
TASK_DATA = {"sequence_classification": "classification", "token_classification": "tagging"}
PROBLEM_TYPES = ("single_label", "multi_label", "regression")  # model.problem_type, as HF's problem_type
REMAT_POLICIES = (
    "none",  # no rematerialisation: every activation is stored for the backward pass
    "full",  # nothing saved: each layer is recomputed in the backward pass (least memory)
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
    "everything_saveable",
)


# model.rope_scaling: rope_type -> (required fields, optional fields), transformers' names (docs/models.md says what
# each does; jaxctx.models.rope computes them). "type" is accepted as the legacy name of rope_type.
ROPE_SCALING_FIELDS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                           "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "longrope": (("short_factor", "long_factor"), ("factor", "original_max_position_embeddings", "attention_factor")),
}
ROPE_TYPES = tuple(ROPE_SCALING_FIELDS)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one model. Field names follow the contract in DESIGN.md."""

    family: str = "gpt2"  # gpt2 | llama | bert
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int | None = None  # key/value heads (GQA, llama); None = num_heads
    d_model: int = 128  # residual stream width
    head_dim: int | None = None  # per-head width; None = d_model // num_heads
    d_ff: int | None = None  # MLP hidden width; None = 4 * d_model (gpt2, bert) or the LLaMA rule (llama)
    vocab_size: int = 512  # rows of the token embedding (byte tokenizer: 256 bytes + specials, padded)
    max_positions: int | None = None  # learned position table size (gpt2, bert); None = data.seq_len
    type_vocab_size: int = 2  # BERT token-type embeddings
    norm_eps: float | None = None  # None = family default (gpt2 1e-5, llama 1e-6, bert 1e-12)
    rope_theta: float = 10000.0  # RoPE base frequency (llama)
    rope_scaling: Mapping[str, Any] | None = None  # HF rope scaling dict {rope_type: ..., ...}: ROPE_SCALING_FIELDS
    tie_embeddings: bool | None = None  # output head shares the input embedding; None = family default
    initializer_range: float = 0.02  # std of the normal initialiser (GPT-2/BERT/LLaMA all use 0.02)
    attention: str = "auto"  # attention kernel: auto | reference | xla | blockwise | cudnn | splash
    attention_block_q: int | None = None  # blockwise query block; None = kernel default
    attention_block_k: int | None = None  # blockwise key block; None = kernel default
    context_parallel: str = "ring"  # with parallel.sequence > 1: ring (rotate K/V) | all_gather (gather K/V)
    mlp_chunk: int = 0  # run the MLP over sequence chunks of this many tokens under remat; 0 = whole sequence
    loss_chunk: int = 0  # cross-entropy over sequence chunks of this many tokens; 0 = materialise [B,T,V] logits
    scan_layers: bool = True  # stack blocks with nn.scan (fast compile, one compiled layer); False = Python loop
    remat_policy: str = "none"  # see REMAT_POLICIES; "full" recomputes each block in the backward pass
    remat_group_size: int = 0  # >1: also remat groups of this many layers (only group inputs saved); 0/1 = off
    dtype: str = "float32"  # compute dtype (bfloat16 on accelerators); params are always float32
    pad_token_id: int = 0  # BERT/HF metadata; never changes the maths (padding is a segment id)
    dropout: float = 0.0  # embeddings + residual branches, train step only (HF hidden_dropout_prob / resid_pdrop)
    attention_dropout: float = 0.0  # attention probabilities, train step only (HF attention_probs_dropout_prob)
    task: str = "lm"  # lm | sequence_classification | token_classification (task heads: jaxctx.models.heads)
    num_labels: int = 0  # task models: classes (1 output for regression); 0 = unset (lm)
    problem_type: str | None = None  # sequence tasks: single_label | multi_label | regression; None = HF's rule
    id2label: tuple[str, ...] | None = None  # label names in id order (carried to/from HF config.json); None = unnamed
    nsp_head: bool = False  # bert lm: also the pooler + next-sentence head of HF BertForPreTraining

    def __post_init__(self):
        # id2label from YAML (a list) or HF (a mapping {"0": "neg", ...}) -> a tuple in id order: the config is
        # hashed (jit, linen), so it may hold no list or dict.
        labels = self.id2label
        if isinstance(labels, Mapping):
            try:
                by_id = {int(k): str(v) for k, v in labels.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"model.id2label keys must be label ids 0..N-1, got {list(labels)}") from None
            if sorted(by_id) != list(range(len(by_id))):
                raise ConfigError(f"model.id2label keys must be the ids 0..{len(by_id) - 1}, got {sorted(by_id)}")
            object.__setattr__(self, "id2label", tuple(by_id[i] for i in range(len(by_id))))
        elif isinstance(labels, list):
            object.__setattr__(self, "id2label", tuple(str(v) for v in labels))

    # --- derived values (the only place the family rules live) ---
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "llama":  # LLaMA rule: 2/3 of 4*d, rounded up to a multiple of 256
            hidden = int(2 * 4 * self.d_model / 3)
            return 256 * ((hidden + 255) // 256)
        return 4 * self.d_model

    @property
    def eps(self) -> float:
        if self.norm_eps is not None:
            return self.norm_eps
        return {"gpt2": 1e-5, "llama": 1e-6, "bert": 1e-12}[self.family]

    @property
    def tied(self) -> bool:
        if self.tie_embeddings is not None:
            return self.tie_embeddings
        return self.family in ("gpt2", "bert")

    @property
    def problem(self) -> str | None:
        """The sequence task's loss: problem_type, else HF's rule (regression iff num_labels == 1)."""
        if self.task != "sequence_classification":
            return None
        if self.problem_type is not None:
            return self.problem_type
        return "regression" if self.num_labels == 1 else "single_label"

    @property
    def causal(self) -> bool:
        return self.family != "bert"

    @property
    def positions(self) -> int:
        """Size of the learned position table (gpt2/bert) or the RoPE context it was configured for."""
        if self.max_positions is None:
            raise ConfigError("model.max_positions is unset; build the model from a full Config or set it")
        return self.max_positions

    def validate(self) -> None:
        _check_choice("model.family", self.family, FAMILIES)
        _check_choice("model.attention", self.attention, ATTENTION_IMPLS)
        _check_choice("model.context_parallel", self.context_parallel, CONTEXT_PARALLEL)
        _check_choice("model.dtype", self.dtype, DTYPES)
        _check_choice("model.remat_policy", self.remat_policy, REMAT_POLICIES)
        for name in ("num_layers", "num_heads", "d_model", "vocab_size"):
            _check_positive(f"model.{name}", getattr(self, name))
        for name in ("num_kv_heads", "head_dim", "d_ff", "max_positions", "attention_block_q",
                     "attention_block_k"):
            if getattr(self, name) is not None:
                _check_positive(f"model.{name}", getattr(self, name))
        if self.remat_group_size not in (0, 1):
            if self.remat_group_size < 0 or self.num_layers % self.remat_group_size:
                raise ConfigError(f"model.remat_group_size={self.remat_group_size} must divide model.num_layers="
                                  f"{self.num_layers} (0 or 1 turns grouping off)")
            if not self.scan_layers or self.remat_policy == "none":
                raise ConfigError("model.remat_group_size needs model.scan_layers=true and a model.remat_policy "
                                  "other than none (it nests a second level of remat around groups of layers)")
        for name in ("dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"model.{name}={rate} must be in [0, 1) (a probability of zeroing; 0 = off)")
        if self.attention_dropout and self.attention in ("cudnn", "pallas_gpu", "splash"):
            raise ConfigError(f"model.attention={self.attention} cannot apply model.attention_dropout="
                              f"{self.attention_dropout} (no dropout mask in that kernel); use model.attention=auto "
                              f"or blockwise")
        if self.family == "llama" and self.dropout:
            raise ConfigError(f"model.dropout={self.dropout} applies to gpt2 and bert (HF LLaMA has no hidden "
                              f"dropout); use model.attention_dropout for llama")
        for name in ("mlp_chunk", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0 (0 turns chunking off)")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}")
        if self.family != "llama":
            if self.kv_heads != self.num_heads:
                raise ConfigError(f"model.num_kv_heads applies to llama only (family={self.family})")
            if self.head_dim is None and self.d_model % self.num_heads:
                raise ConfigError(
                    f"model.d_model={self.d_model} must be divisible by model.num_heads={self.num_heads}")
            if self.rope_scaling is not None:
                raise ConfigError(f"model.rope_scaling applies to llama only (family={self.family})")
        if self.family == "llama" and self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.num_heads="
                              f"{self.num_heads}; set model.head_dim explicitly")
        if self.family == "llama" and self.dim_per_head % 2:
            raise ConfigError(f"RoPE needs an even head dim, got {self.dim_per_head}")
        if self.family == "bert" and not self.tied:
            raise ConfigError("model.tie_embeddings=false is not supported for bert (HF ties the MLM decoder)")
        if self.rope_scaling is not None:
            validate_rope_scaling(self.rope_scaling, self.dim_per_head)
        self._validate_task()

    def _validate_task(self) -> None:
        """model.task / num_labels / problem_type / id2label / nsp_head are consistent (one key named per error)."""
        _check_choice("model.task", self.task, TASKS)
        if self.problem_type is not None:
            _check_choice("model.problem_type", self.problem_type, PROBLEM_TYPES)
        if self.task == "lm":
            for key, unset in (("num_labels", 0), ("problem_type", None), ("id2label", None)):
                if getattr(self, key) != unset:
                    raise ConfigError(f"model.{key}={getattr(self, key)!r} needs a task model: set model.task to "
                                      f"sequence_classification or token_classification (model.task=lm)")
        else:
            if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
                raise ConfigError(f"model.num_labels={self.num_labels!r} must be a positive integer for "
                                  f"model.task={self.task} (the number of classes; 1 for regression)")
            if self.nsp_head:
                raise ConfigError(f"model.nsp_head=true is the BertForPreTraining head of a language model; a "
                                  f"task model (model.task={self.task}) has its own head: set it false")
        if self.task == "token_classification" and self.problem_type not in (None, "single_label"):
            raise ConfigError(f"model.problem_type={self.problem_type} applies to sequence_classification; token "
                              f"classification is single_label (cross-entropy per token)")
        if self.problem == "regression" and self.num_labels != 1:
            raise ConfigError(f"model.num_labels={self.num_labels} with model.problem_type=regression: regression "
                              f"predicts one value, set model.num_labels=1")
        if self.problem_type == "single_label" and self.task == "sequence_classification" and self.num_labels < 2:
            raise ConfigError(f"model.num_labels={self.num_labels} with model.problem_type={self.problem_type}: "
                              f"classification needs model.num_labels >= 2")
        if self.id2label is not None:
            if len(self.id2label) != self.num_labels:
                raise ConfigError(f"model.id2label names {len(self.id2label)} labels but model.num_labels="
                                  f"{self.num_labels}; give one name per label id")
            if len(set(self.id2label)) != len(self.id2label):
                raise ConfigError(f"model.id2label={list(self.id2label)} repeats a name; label names must be "
                                  f"unique")
        if self.nsp_head and self.family != "bert":
            raise ConfigError(f"model.nsp_head=true is BERT's next-sentence head; model.family={self.family} "
                              f"has none")


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline (jaxctx.data); docs/data.md describes each stage."""

    source: str = "stdlib"  # "stdlib" (Python's own .py sources), a local file/glob/directory, or "hub:NAME"
    format: str | None = None  # text | json | parquet | csv (labelled data); None = guessed from the file extension
    text_field: str = "text"  # column holding the document text (json/parquet)
    text_unit: str = "document"  # text files: one document per file | paragraph (blank-line separated) | line
    hub_subset: str | None = None  # hub datasets: configuration name (e.g. wikitext-103-raw-v1)
    tokenizer: str = "byte"  # "byte" (built-in byte-level tokenizer) or a local Hugging Face tokenizer directory
    seq_len: int = 256  # tokens per packed training sequence
    streaming: bool = False  # stream the corpus instead of loading it into memory-mapped Arrow files
    validation_fraction: float = 0.02  # share of documents held out (split by file-name/document hash)
    max_documents: int = 0  # use at most this many documents per split (0 = all): quick runs and tests
    mlm_probability: float = 0.15  # BERT: share of non-special tokens chosen for masking
    nsp: bool = False  # BERT: one [CLS] A [SEP] B [SEP] pair per row + next-sentence loss (needs model.nsp_head)
    num_proc: int = 2  # worker processes for datasets.map tokenization
    shuffle: bool = True  # new document and sequence order every epoch (streaming: buffered document shuffle)
    shuffle_buffer: int = 1024  # streaming only: documents held in the shuffle buffer
    cache_dir: str | None = None  # datasets cache for loaded and tokenized Arrow files; None = HF_DATASETS_CACHE
    # Labelled data for task models (jaxctx.data.task; docs/finetuning.md "Labelled data").
    task: str | None = None  # classification (text [+ text_pair] + label) | tagging (tokens + tags); None = LM text
    label_field: str = "label"  # classification: column with the label (string, int, list for multi_label, float)
    text_pair_field: str | None = None  # classification: second text of a pair (bert token type 1); None = single
    tokens_field: str = "tokens"  # tagging: column with the list of words
    tags_field: str = "tags"  # tagging: column with one tag per word (BIO strings or ids)
    max_examples_per_row: int = 16  # E: example slots per packed row (cls_index/labels [B, E]); a row closes when full
    # Synthetic passkey documents (jaxctx.data.passkey_docs; docs/data.md "Passkey documents").
    passkey_fraction: float = 0.0  # share of the packed tokens that are passkey documents; 0 = none
    passkey_max_digits: int = 5  # training keys have 5..N digits (uniform); the eval's keys have 5
    passkey_min_length: int = 0  # passkey documents have this many to seq_len - 1 tokens; 0 = the shortest possible
    passkey_full_length_fraction: float = 0.0  # share of passkey documents exactly seq_len - 1 tokens long
    align_documents: bool = False  # every document starts a row (its last row's tail is padding): none is split

    def validate(self) -> None:
        if self.task is not None:
            _check_choice("data.task", self.task, tuple(TASK_DATA.values()))
            _check_positive("data.max_examples_per_row", self.max_examples_per_row)
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2 (next-token targets need two tokens)")
        if self.format is not None:
            _check_choice("data.format", self.format, ("text", "json", "parquet", "csv"))
        _check_choice("data.text_unit", self.text_unit, ("document", "paragraph", "line"))
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction={self.validation_fraction} must be in [0, 1)")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability={self.mlm_probability} must be in (0, 1)")
        _check_positive("data.num_proc", self.num_proc)
        for name in ("max_documents", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 0 (0 turns it off)")
        if not self.text_field:
            raise ConfigError("data.text_field must name a column (e.g. text)")
        if not 0.0 <= self.passkey_fraction < 1.0:
            raise ConfigError(f"data.passkey_fraction={self.passkey_fraction} must be in [0, 1) (the share of tokens "
                              f"that are synthetic passkey documents; 0 = none)")
        if not 5 <= self.passkey_max_digits <= 64:
            raise ConfigError(f"data.passkey_max_digits={self.passkey_max_digits} must be in [5, 64] (training keys "
                              f"have 5 to this many digits; the eval asks for 5)")
        if self.passkey_min_length < 0:
            raise ConfigError(f"data.passkey_min_length={self.passkey_min_length} must be >= 0 (0 = the shortest "
                              f"passkey document)")
        if self.passkey_min_length >= self.seq_len:
            raise ConfigError(f"data.passkey_min_length={self.passkey_min_length} must be below data.seq_len="
                              f"{self.seq_len} (a document and its separator fit one row)")
        if not 0.0 <= self.passkey_full_length_fraction <= 1.0:
            raise ConfigError(f"data.passkey_full_length_fraction={self.passkey_full_length_fraction} must be in "
                              f"[0, 1] (the share of passkey documents that fill a whole row)")
        if self.passkey_fraction and self.streaming:
            raise ConfigError("data.passkey_fraction needs a map-style corpus (its documents are sized from the "
                              "corpus's token count); set data.streaming=false or data.passkey_fraction=0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the training loop (jaxctx.train)."""

    batch_size: int = 8  # global batch, in sequences
    steps: int = 200  # optimizer steps
    seed: int = 0  # params init, data order and dropout all derive from it
    log_every: int = 10  # steps between metrics.jsonl rows
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    eval_every: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8  # batches per validation pass
    init_from: str | None = None  # params from a converted or earlier checkpoint, fresh optimizer
    extend_positions: str | None = None  # init_from a checkpoint with a shorter learned position table (gpt2/bert):
                                         # tile | copy | interpolate it to model.max_positions rows; None = refuse
    stop_after: int = 0  # checkpoint and stop after this step (schedule unchanged; resume later); 0 = off
    optimizer: str = "adamw"  # adamw | adafactor | lion
    learning_rate: float = 3e-4  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to the peak
    decay: str = "cosine"  # cosine | linear | constant, after warmup
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    weight_decay: float = 0.1  # decoupled; not applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    keep_best: str | None = None  # task models: keep the checkpoint with the best value of this validation metric
                                  # (e.g. accuracy, macro_f1, entity_f1, val_loss) in WORKDIR/best/; None = off
    peak_tflops: float | None = None  # peak TFLOP/s per device for metrics' mfu; None = data-sheet table (none on CPU)
    wandb_project: str | None = None  # also log metrics to this Weights & Biases project (pip install wandb)
    wandb_mode: str = "online"  # online | offline (files under ./wandb, `wandb sync` later) | disabled

    def validate(self) -> None:
        for name in ("batch_size", "steps", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum",
                     "eval_batches"):
            _check_positive(f"train.{name}", getattr(self, name))
        if self.stop_after < 0:
            raise ConfigError(f"train.stop_after={self.stop_after} must be >= 0 (0 = run to train.steps)")
        _check_choice("train.optimizer", self.optimizer, ("adamw", "adafactor", "lion"))
        _check_choice("train.decay", self.decay, ("cosine", "linear", "constant"))
        _check_choice("train.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        if self.extend_positions is not None:
            _check_choice("train.extend_positions", self.extend_positions, ("tile", "copy", "interpolate"))
            if not self.init_from:
                raise ConfigError(f"train.extend_positions={self.extend_positions} resizes the position table of "
                                  f"train.init_from's checkpoint; set train.init_from too (or drop the key)")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"train.peak_tflops={self.peak_tflops} must be a positive number of TFLOP/s per "
                              f"device (or null for the data-sheet table)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                              f"train.grad_accum={self.grad_accum}")


@dataclass(frozen=True)
class ParallelConfig:
    """Device mesh and distribution (jaxctx.parallel)."""

    mode: str = "jit"  # jit (sharded over the mesh) | pmap (data parallel)
    data: int = -1  # data-parallel axis size; -1 = all devices left over
    fsdp: int = 1  # parameter/optimizer-state sharding axis size
    sequence: int = 1  # context-parallel axis size: each sequence split over this many devices (ring attention)
    tensor: int = 1  # tensor (head/MLP) parallel axis size
    coordinator_address: str | None = None  # multi-host: host:port of process 0 (else from the environment)
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> None:
        _check_choice("parallel.mode", self.mode, ("jit", "pmap"))
        for name in ("fsdp", "sequence", "tensor"):
            _check_positive(f"parallel.{name}", getattr(self, name))
        if self.mode == "pmap" and self.sequence != 1:
            raise ConfigError(f"parallel.mode=pmap is data parallel only and cannot split sequences: set "
                              f"parallel.sequence=1 (got {self.sequence}) or use parallel.mode=jit")
        if self.data != -1:
            _check_positive("parallel.data", self.data)


@dataclass(frozen=True)
class Config:
    """The whole experiment. `max_positions` defaults to `data.seq_len`, resolved here once."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def resolved(self) -> "Config":
        """Fill derived defaults (model.max_positions = data.seq_len) and validate."""
        cfg = self
        if cfg.model.max_positions is None:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_positions=cfg.data.seq_len))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for section in (self.model, self.data, self.train, self.parallel):
            section.validate()
        for key in ("attention_block_q", "attention_block_k", "mlp_chunk", "loss_chunk"):
            size = getattr(self.model, key)
            if size and size > self.data.seq_len:
                raise ConfigError(f"model.{key}={size} exceeds data.seq_len={self.data.seq_len}; use a block or "
                                  f"chunk no longer than the sequence (or 0/null for the default)")
        self._validate_context_parallel()
        self._validate_task_data()
        if self.data.passkey_fraction and (not self.model.causal or self.model.task != "lm"):
            raise ConfigError(f"data.passkey_fraction={self.data.passkey_fraction} trains next-token retrieval: it "
                              f"needs a causal LM (model.family gpt2 or llama, model.task=lm), not "
                              f"model.family={self.model.family} model.task={self.model.task}")
        if self.model.attention == "splash" and self.data.seq_len % 128:
            raise ConfigError(f"model.attention=splash needs data.seq_len divisible by 128, got "
                              f"{self.data.seq_len}; round it to a multiple of 128 or use blockwise")
        if self.model.max_positions is not None and self.model.family != "llama":
            if self.data.seq_len > self.model.max_positions:
                raise ConfigError(
                    f"data.seq_len={self.data.seq_len} exceeds model.max_positions={self.model.max_positions} "
                    f"(the learned position table of {self.model.family}); raise model.max_positions")

    def _validate_task_data(self) -> None:
        """data.task is the labelled format model.task trains on (classification <-> sequence_classification)."""
        if self.data.nsp:
            if self.model.family != "bert" or not self.model.nsp_head:
                raise ConfigError(f"data.nsp=true trains BERT's next-sentence head; it needs model.family=bert and "
                                  f"model.nsp_head=true (got model.family={self.model.family}, "
                                  f"model.nsp_head={str(self.model.nsp_head).lower()})")
            if self.data.task is not None or self.data.streaming:
                raise ConfigError("data.nsp=true builds pairs from a memory-mapped plain-text corpus; unset "
                                  "data.task and data.streaming")
        if self.data.task is None:
            return
        want = TASK_DATA.get(self.model.task)
        if want is None:
            raise ConfigError(f"data.task={self.data.task} gives labelled batches but model.task={self.model.task}; "
                              f"set model.task=" + " or ".join(f"{t} (data.task={d})" for t, d in TASK_DATA.items()))
        if self.data.task != want:
            raise ConfigError(f"data.task={self.data.task} does not fit model.task={self.model.task}: set "
                              f"data.task={want}")
        n = self.parallel.sequence
        if self.data.task == "classification" and self.data.max_examples_per_row % n:
            raise ConfigError(f"data.max_examples_per_row={self.data.max_examples_per_row} must be a multiple of "
                              f"parallel.sequence={n} (the example slots are split over the sequence axis)")

    def _validate_context_parallel(self) -> None:
        """parallel.sequence = N > 1: zigzag needs 2N equal chunks; attention must be the ring; chunks fit a shard."""
        n, t = self.parallel.sequence, self.data.seq_len
        if n == 1:
            return
        if t % (2 * n):
            raise ConfigError(f"data.seq_len={t} must be divisible by 2 x parallel.sequence = {2 * n} (the zigzag "
                              f"layout splits each sequence into {2 * n} equal chunks); use a multiple of {2 * n}")
        if self.model.attention != "auto":
            raise ConfigError(f"model.attention={self.model.attention} cannot split a sequence over devices: with "
                              f"parallel.sequence={n} set model.attention=auto (the ring kernel; "
                              f"model.context_parallel picks ring or all_gather)")
        for key in ("mlp_chunk", "loss_chunk"):
            size = getattr(self.model, key)
            if size and size > t // n:
                raise ConfigError(f"model.{key}={size} exceeds the {t // n} tokens each device holds (data.seq_len="
                                  f"{t} / parallel.sequence={n}); use a chunk of at most {t // n}")

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (tuples such as model.id2label become lists: YAML and JSON safe)."""
        def plain(value):
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return plain(dataclasses.asdict(self))


# ----------------------------------------------------------------------------------------------------------
# Loading: YAML file + key=value overrides -> Config
# ----------------------------------------------------------------------------------------------------------

def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive integer")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rope_scaling(scaling: Mapping[str, Any], head_dim: int, key: str = "model.rope_scaling") -> None:
    """A known rope_type, its required fields present, no unknown field, every value of the right kind."""
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{key}={scaling!r} must be a mapping such as {{rope_type: linear, factor: 4}}")
    fields = dict(scaling)
    kind, legacy = fields.pop("rope_type", None), fields.pop("type", None)
    if kind is not None and legacy is not None and kind != legacy:
        raise ConfigError(f"{key} has rope_type={kind!r} and type={legacy!r}; keep rope_type (type is its legacy "
                          f"name)")
    kind = legacy if kind is None else kind
    _check_choice(f"{key}.rope_type", kind, ROPE_TYPES)
    required, optional = ROPE_SCALING_FIELDS[kind]
    for name in fields:
        if name not in required + optional:
            hint = ("the base is model.rope_theta" if name == "rope_theta" else
                    f"it takes {', '.join(required + optional)}" if required + optional else "it takes no fields")
            raise ConfigError(f"{key}.{name} is not a field of rope_type={kind}; {hint}")
    missing = [name for name in required if fields.get(name) is None]
    if missing:
        raise ConfigError(f"{key}.{missing[0]} is missing: rope_type={kind} needs {', '.join(required)}")
    half = head_dim // 2
    for name, value in fields.items():
        if value is None:  # an optional field left unset
            continue
        if name == "truncate":
            ok, want = isinstance(value, bool), "true or false"
        elif name == "original_max_position_embeddings":
            ok, want = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        elif name in ("short_factor", "long_factor"):
            ok = (isinstance(value, (list, tuple)) and len(value) == half
                  and all(_is_number(v) and v > 0 for v in value))
            want = f"a list of {half} positive numbers (one per frequency: head dim {head_dim} / 2)"
        elif name in ("mscale", "mscale_all_dim"):
            ok, want = _is_number(value) and value >= 0, "a number >= 0"
        else:
            ok, want = _is_number(value) and value > 0, "a positive number"
        if not ok:
            shown = f"<list of {len(value)}>" if isinstance(value, (list, tuple)) else repr(value)
            raise ConfigError(f"{key}.{name}={shown} must be {want} (rope_type={kind})")
    if kind == "dynamic" and head_dim <= 2:  # its base is raised to Dh / (Dh - 2)
        raise ConfigError(f"{key} rope_type=dynamic needs a head dim above 2, got {head_dim}")
    if kind == "llama3" and fields["low_freq_factor"] >= fields["high_freq_factor"]:
        raise ConfigError(f"{key}.low_freq_factor={fields['low_freq_factor']} must be below high_freq_factor="
                          f"{fields['high_freq_factor']} (rope_type=llama3)")


def _suggest(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert) one value against its field's type annotation (X, or X | None)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    base = typing.get_origin(base) or base
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if base is tuple:  # model.id2label: a list of names, or a mapping {id: name} (ModelConfig orders it)
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
            return tuple(str(v) for v in value)
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}={value!r} must be a list of names (or a mapping id -> name)")
    if base in (Mapping, dict, collections.abc.Mapping):
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return value


def _section_from_dict(cls, values: Mapping[str, Any], prefix: str):
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}" + _suggest(key, names))
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig}


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build a (not yet resolved) Config from a nested dict such as a parsed YAML file."""
    sections = {}
    for name, sub in (values or {}).items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}" + _suggest(name, list(SECTIONS)))
        if sub is None:
            sub = {}
        if not isinstance(sub, Mapping):
            raise ConfigError(f"config section {name!r} must be a mapping, got {type(sub).__name__}")
        sections[name] = _section_from_dict(SECTIONS[name], sub, f"{name}.")
    return Config(**sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.d_model=256` -> (["model", "d_model"], 256); the value is parsed as YAML (so 1e-4, true, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override key {key!r} must look like section.key (e.g. train.steps)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return path, value


def load(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides; returns a resolved, validated Config."""
    values: dict = {}
    if path is not None:
        from jaxctx import storage  # local or gs:// (e.g. the config.yaml of a from-hf checkpoint on GCS)

        path = os.fspath(path)
        if not storage.exists(path):
            raise ConfigError(f"config file {path} does not exist")
        if not storage.isfile(path):
            raise ConfigError(f"config file {path} is not a file (give a .yaml experiment file)")
        try:
            values = yaml.safe_load(storage.read_bytes(path).decode("utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                              f"UTF-8 YAML") from None
        except OSError as err:
            raise ConfigError(f"config file {path} cannot be read: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in values.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        if not isinstance(values.setdefault(section, {}), dict):
            values[section] = {}
        values[section][key] = value
    try:
        return from_dict(values).resolved()
    except ConfigError as err:
        where = f" (in {path}{' with --set overrides' if overrides else ''})" if path else ""
        raise ConfigError(f"{err}{where}") from None


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML (what a workdir's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
