"""Hugging Face <-> jaxctx conversion: the Python API and the two directory-to-directory jobs of the CLI.

    cfg, params = from_hf("gpt2-dir")                      # params: numpy f32, the tree build(cfg).init makes
    logits = jaxctx.models.build(cfg).apply({"params": params}, input_ids)
    to_hf(cfg, params, "out-dir", dtype="bfloat16")         # config.json + safetensors, loadable by transformers
    to_hf(cfg, params, "out-dir", tokenizer_dir="byte")     # + the byte tokenizer, token ids, generation config

    import_checkpoint("gpt2-dir", "ckpt")   # `jaxctx convert from-hf`: a params-only jaxctx checkpoint
    export_checkpoint("workdir", "hf-out")  # `jaxctx convert to-hf`: latest checkpoint of a workdir/checkpoint

The families (hf_gpt2.py, hf_bert.py, hf_llama.py) hold the config maps and the tensor rules; mapping.py the
layout transforms and the checks; io.py the files. A from-hf checkpoint directory is an Orbax checkpoint root
(`jaxctx.checkpoint.save_params`, step 0, meta {"config", "step", "source"}) plus two extras that the checkpoint
manager ignores: `config.yaml` (the converted config, ready for `train.py --config`) and `hf_files/` (the source
config.json, tokenizer and generation config), which `to-hf` carries back out.

An export ships the tokenizer the checkpoint was trained with (`_choose_tokenizer`; tokenizer_files.py writes the
byte tokenizer), its bos/eos/pad ids in config.json and generation_config.json, and a README.md model card
(model_card.py) of what the checkpoint and its workdir recorded.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from jaxctx import config as config_lib
from jaxctx import storage
from jaxctx.config import Config, DataConfig, ModelConfig
from jaxctx.convert import hf_bert, hf_gpt2, hf_llama, io, mapping, model_card, staging, tokenizer_files
from jaxctx.convert.errors import (ConvertError, TensorMismatchError, TokenizerNotFoundError,
                                   UnsupportedModelError)

FAMILIES = {module.MODEL_TYPE: module for module in (hf_gpt2, hf_bert, hf_llama)}  # HF model_type = our family
HF_FILES = "hf_files"  # side directory of a from-hf checkpoint
GENERATION_FILE = "generation_config.json"


# ----------------------------------------------------------------------------------------------------------
# HF -> jaxctx
# ----------------------------------------------------------------------------------------------------------

def _family(hf: dict, where: str):
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{where}: model_type={model_type!r} is not supported; jaxctx converts "
                                    f"{', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    architectures = hf.get("architectures") or []
    if architectures and not set(architectures) & set(family.ARCHITECTURES):
        raise UnsupportedModelError(f"{where}: architectures={architectures} is not supported for {model_type}; "
                                    f"jaxctx converts {', '.join(family.ARCHITECTURES)}")
    return family


def from_hf(hf_dir: str, *, max_positions: int | None = None, extend_positions: str | None = None,
            rope_scaling: str | None = None, scan_layers: bool = True) -> tuple[Config, dict]:
    """Read a HF directory (config.json + safetensors) -> (resolved Config, params as numpy float32).

    params is exactly the tree `jaxctx.models.build(cfg).init` makes (scanned `layers/` with a leading [L] axis
    when scan_layers, else `layers_0/`, ...). max_positions resizes the learned position table of gpt2/bert with
    extend_positions (tile | copy | interpolate, default tile; see `mapping.resize_positions`); for llama it sets
    max_positions (RoPE has no table) and, with rope_scaling (linear | yarn), scales RoPE by max_positions / the
    model's own context so the new length maps onto the positions it was trained on.
    """
    hf_dir = os.path.abspath(hf_dir)
    hf = io.read_hf_config(hf_dir)
    where = os.path.join(hf_dir, io.CONFIG_FILE)
    family = _family(hf, where)
    fields = family.config_from_hf(hf, where)
    source = io.open_tensors(hf_dir)
    if hasattr(family, "with_tensors"):  # bert: a next-sentence head in the file is kept (model.nsp_head)
        fields = family.with_tensors(fields, {family.canonical(name) for name in source.names()})
    try:
        model = ModelConfig(**fields, scan_layers=scan_layers)
        model.validate()
    except config_lib.ConfigError as err:
        raise UnsupportedModelError(f"{where}: {err}") from None
    flat = _tensors_to_params(family, model, source)
    model, flat = _extend_positions(model, flat, max_positions, extend_positions, rope_scaling)
    params = mapping.unflatten(flat)
    if scan_layers:
        params = mapping.scanned(params)
    data = DataConfig(seq_len=min(DataConfig.seq_len, model.positions))
    return Config(model=model, data=data).resolved(), params


def _tensors_to_params(family, model: ModelConfig, source: io.TensorSource) -> dict[str, np.ndarray]:
    """Names normalised, buffers dropped, tied copies verified, every name/shape checked, then converted."""
    names: dict[str, str] = {}  # canonical name -> name in the file
    for name in source.names():
        key = family.canonical(name)
        if key in names:
            raise TensorMismatchError(f"{source.description}: {names[key]} and {name} are the same tensor "
                                      f"({key}) under two names")
        names[key] = name
    for key in [key for key in names if family.IGNORED.fullmatch(key)]:
        del names[key]  # buffers (masks, position ids, rotary frequencies): not weights
    rules = family.rules(model)
    used = {rule.hf for rule in rules}
    heads = sorted(key for key in names if family.DROPPED.fullmatch(key) and key not in used)
    if heads:
        warnings.warn(f"{source.description}: dropped tensors that {_architecture(family, model)} does not have: "
                      f"{', '.join(heads)}", stacklevel=3)
        for key in heads:
            del names[key]
    for copy, original in family.tied_copies(model).items():
        if copy in names and original in names:
            if not np.array_equal(source.load(names[copy]), source.load(names[original])):
                raise TensorMismatchError(f"{source.description}: {copy} differs from {original}, but the config "
                                          f"ties them (tie_word_embeddings); converting would drop one of them")
            del names[copy]
    found = {key: (source.infos[name].shape, source.infos[name].dtype) for key, name in names.items()}
    mapping.check_tensors(rules, found, source.description, io.FLOAT_HEADER_DTYPES)
    our_shapes = mapping.model_shapes(model)
    flat: dict[str, np.ndarray] = {}
    for rule in rules:
        flat.update(mapping.to_ours(rule, source.load_float32(names[rule.hf]), our_shapes))
    mapping.check_params(our_shapes, flat, "converted params")  # the family's rules cover the whole model
    return flat


def _architecture(family, model: ModelConfig) -> str:
    """The transformers class a jaxctx model config converts to."""
    if hasattr(family, "architecture"):
        return family.architecture(model)
    return family.EXPORT_ARCHITECTURES[model.task]


ROPE_EXTENSIONS = ("linear", "yarn")  # rope_types set from one factor (max_positions / the model's own context)


def _extend_positions(model: ModelConfig, flat: dict, max_positions: int | None, method: str | None,
                      rope_type: str | None = None):
    for name, value in (("extend_positions", method), ("rope_scaling", rope_type)):
        if max_positions is None and value is not None:
            raise ConvertError(f"{name}={value!r} needs max_positions (--max-positions N)")
    if max_positions is None:
        return model, flat
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise ConvertError(f"max_positions={max_positions!r} must be a positive integer")
    if rope_type is not None and model.family != "llama":
        raise ConvertError(f"rope_scaling applies to RoPE models (llama); {model.family} has a learned position "
                           f"table: use extend_positions (--extend-positions)")
    if model.family == "llama":
        if method is not None:
            raise ConvertError("llama has no learned position table to extend (RoPE); pass max_positions alone to "
                               "set max_position_embeddings, with rope_scaling (--rope-scaling linear|yarn) to "
                               "scale RoPE to it")
        if rope_type is not None:
            return _scaled_rope(model, max_positions, rope_type), flat
    else:
        method = method or "tile"
        if method not in mapping.EXTEND_METHODS:
            raise ConvertError(f"extend_positions={method!r} is not one of {', '.join(mapping.EXTEND_METHODS)}")
        flat = dict(flat)
        flat["pos_embed/embedding"] = mapping.resize_positions(flat["pos_embed/embedding"], max_positions, method,
                                                               model.initializer_range)
    return dataclasses.replace(model, max_positions=max_positions), flat


def _scaled_rope(model: ModelConfig, max_positions: int, rope_type: str) -> ModelConfig:
    """model with max_positions and a `rope_type` scaling of factor max_positions / its current context."""
    if rope_type not in ROPE_EXTENSIONS:
        raise ConvertError(f"rope_scaling={rope_type!r} is not one of {', '.join(ROPE_EXTENSIONS)} (other types "
                           f"take more fields: set model.rope_scaling in the config instead)")
    if model.rope_scaling is not None:
        raise ConvertError(f"the model already has rope_scaling {dict(model.rope_scaling)}; set model.rope_scaling "
                           f"in the config to change it")
    original = model.positions
    if max_positions <= original:
        raise ConvertError(f"max_positions={max_positions} must exceed the model's context ({original}) to extend "
                           f"it with rope_scaling={rope_type}")
    scaling = {"rope_type": rope_type, "factor": max_positions / original}
    if rope_type == "yarn":  # the context its frequencies were trained on (its default would be the new length)
        scaling["original_max_position_embeddings"] = original
    return dataclasses.replace(model, max_positions=max_positions, rope_scaling=scaling)


# ----------------------------------------------------------------------------------------------------------
# jaxctx -> HF
# ----------------------------------------------------------------------------------------------------------

def to_hf(cfg: Config | ModelConfig, params, out_dir: str, *, dtype: str = "float32",
          shard_size: str | int = "5GB", force: bool = False, hf_config: dict | None = None,
          tokenizer_dir: str | None = None, card: str | None = None) -> str:
    """Write params (either layer layout, boxed or not) as a HF directory; returns its absolute path.

    dtype: float32 | bfloat16 | float16 (tensors and config.json "dtype"). shard_size: above it the weights are
    sharded (model-0000k-of-0000n.safetensors + index). hf_config: a source config.json whose non-architectural
    keys (token ids, dropout rates) are kept. tokenizer_dir: tokenizer / generation-config files copied along, or
    "byte" to write the built-in byte tokenizer; its bos/eos/pad ids go into config.json and, for causal LMs, into
    a generation_config.json (unless tokenizer_dir brings its own). card: README.md text.
    OUT_DIR appears only once complete; a non-empty OUT_DIR is refused unless force.
    """
    model = cfg.resolved().model if isinstance(cfg, Config) else cfg
    if not isinstance(model, ModelConfig):
        raise TypeError(f"to_hf expects a jaxctx Config or ModelConfig, got {type(cfg).__name__}")
    model.validate()
    if model.max_positions is None:
        raise ConvertError("model.max_positions is unset; pass a full Config or set it (it becomes the HF "
                           "n_positions / max_position_embeddings)")
    family = FAMILIES[model.family]
    problems = family.export_problems(model)
    if problems:
        raise UnsupportedModelError(f"cannot export to transformers: {'; '.join(problems)}")
    if dtype not in io.DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {', '.join(io.DTYPES)}")
    shard_bytes = io.parse_size(shard_size)

    flat = mapping.flatten(mapping.unscanned(params))
    mapping.check_params(mapping.model_shapes(model), flat, "params")
    tensors = {rule.hf: io.cast(mapping.to_hf(rule, flat), dtype) for rule in family.rules(model)}

    config_json = {key: hf_config[key] for key in family.CARRY_KEYS if hf_config and key in hf_config}
    config_json.update(family.config_to_hf(model))
    config_json["dtype"] = dtype
    is_byte = tokenizer_dir == "byte"
    if tokenizer_dir is not None:
        tokenizer_files.check_fits(tokenizer_dir, model.vocab_size)
        # The tokenizer's own ids win over carried ones: config.json must describe the tokenizer shipped with it.
        config_json.update(tokenizer_files.byte_token_ids() if is_byte else tokenizer_files.token_ids(tokenizer_dir))
    ids = {key: config_json[key] for key in tokenizer_files.TOKEN_ID_KEYS if config_json.get(key) is not None}
    sources = tuple(d for d in (tokenizer_dir,) if d and not is_byte)
    with io.output_dir(out_dir, force=force, sources=sources) as tmp:
        io.write_tensors(tmp, tensors, shard_bytes)
        io.write_json(os.path.join(tmp, io.CONFIG_FILE), config_json)
        if is_byte:
            tokenizer_files.write_byte_tokenizer(tmp, model_max_length=model.positions)
        else:
            io.copy_side_files(tokenizer_dir, tmp)
        if tokenizer_dir is not None:  # task models: the pipelines must add the specials fine-tuning added
            tokenizer_files.add_task_template(tmp, model.task, model.causal, tokenizer_dir)
        generation = os.path.join(tmp, GENERATION_FILE)
        if model.causal and ids and not os.path.exists(generation):  # a copied one (from-hf source) is kept
            io.write_json(generation, ids)
        if card is not None:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
    return os.path.abspath(out_dir)


# ----------------------------------------------------------------------------------------------------------
# Directory to directory (the CLI)
# ----------------------------------------------------------------------------------------------------------

def import_checkpoint(hf_dir: str, out_dir: str, *, force: bool = False, max_positions: int | None = None,
                      extend_positions: str | None = None, rope_scaling: str | None = None,
                      recorded_as: tuple[str, str] | None = None) -> dict:
    """`jaxctx convert from-hf`: HF directory -> params-only jaxctx checkpoint (+ config.yaml, hf_files/).

    Either may be a gs:// URL (staged through a local temp dir, see staging.py); recorded_as: the (source,
    output) paths the checkpoint records instead of the local ones, which staging passes.
    """
    from jaxctx.checkpoint import save_params

    if staging.involves_url(hf_dir, out_dir):
        with staging.temp_dir() as tmp, staging.local_output(out_dir, tmp, force=force,
                                                             sources=(hf_dir,)) as local_out:
            local_hf = staging.stage_hf_dir(hf_dir, tmp) if storage.is_url(hf_dir) else hf_dir
            report = import_checkpoint(local_hf, local_out, force=force, max_positions=max_positions,
                                       extend_positions=extend_positions, rope_scaling=rope_scaling,
                                       recorded_as=(storage.absolute(hf_dir), storage.absolute(out_dir)))
        return {**report, "out_dir": storage.absolute(out_dir)}
    hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
    recorded_hf, recorded_out = recorded_as or (hf_dir, out_dir)
    cfg, params = from_hf(hf_dir, max_positions=max_positions, extend_positions=extend_positions,
                          rope_scaling=rope_scaling)
    side_files = [name for name in io.SIDE_FILES if os.path.isfile(os.path.join(hf_dir, name))]
    if io.has_tokenizer_files(hf_dir):  # the converted config trains with the model's own tokenizer
        tokenizer = storage.join(recorded_out, HF_FILES)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))
    hf = io.read_hf_config(hf_dir)
    meta = {"config": cfg.to_dict(), "step": 0,
            "source": {"format": "huggingface", "path": recorded_hf, "model_type": hf.get("model_type"),
                       "architectures": hf.get("architectures")}}
    with io.output_dir(out_dir, force=force, sources=(hf_dir,)) as tmp:
        save_params(tmp, params, meta)
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_lib.to_yaml(cfg))
        os.makedirs(os.path.join(tmp, HF_FILES))
        io.copy_side_files(hf_dir, os.path.join(tmp, HF_FILES), io.SIDE_FILES + (io.CONFIG_FILE,))
    return {"out_dir": out_dir, "config": cfg, "params": _count(params), "side_files": side_files}


def export_checkpoint(src: str, out_dir: str, *, force: bool = False, dtype: str = "float32",
                      shard_size: str | int = "5GB", step: int | None = None, tokenizer: str | None = None,
                      recorded_source: str | None = None) -> dict:
    """`jaxctx convert to-hf`: a checkpoint root or training workdir (latest step) -> HF directory.

    The export holds the weights, config.json (with the tokenizer's bos/eos/pad ids), the tokenizer (see
    `_choose_tokenizer`; `tokenizer` = a directory or "byte" overrides it), generation_config.json for causal LMs
    and a README.md model card of what the checkpoint and workdir recorded.

    src, out_dir and tokenizer may be gs:// URLs: one step's params and the workdir's small files are downloaded
    to a local temp dir and the export uploaded (staging.py); recorded_source: the source the card names then.
    """
    from jaxctx.checkpoint import checkpoint_dir, load_params

    if staging.involves_url(src, out_dir, tokenizer):
        sources = (src, storage.join(src, "checkpoints"))
        with staging.temp_dir() as tmp, staging.local_output(out_dir, tmp, force=force, sources=sources) as local_out:
            local_src = staging.stage_checkpoint(src, step, tmp) if storage.is_url(src) else src
            if tokenizer is not None and storage.is_url(tokenizer):
                tokenizer = staging.stage_hf_dir(tokenizer, tmp)
            report = export_checkpoint(local_src, local_out, force=force, dtype=dtype, shard_size=shard_size,
                                       step=step, tokenizer=tokenizer, recorded_source=storage.absolute(src))
        return {**report, "out_dir": storage.absolute(out_dir)}
    src = os.path.abspath(src)
    root = checkpoint_dir(src)
    if out_dir and os.path.abspath(out_dir) in (src, root):
        raise ConvertError(f"output directory {out_dir} would replace the input checkpoint; choose another OUT_DIR")
    params, meta = load_params(src, step=step)
    if "config" not in meta:
        raise ConvertError(f"{root}: checkpoint meta has no \"config\"; cannot tell which model it holds")
    cfg = _with_workdir_labels(config_lib.from_dict(meta["config"]).resolved(), src, root)
    side_dir = _side_dir(src, root, cfg)
    hf_config = None
    if side_dir and os.path.isfile(os.path.join(side_dir, io.CONFIG_FILE)):
        hf_config = io.read_hf_config(side_dir)
    tokenizer_dir = _choose_tokenizer(root, cfg, meta, side_dir, tokenizer)
    shown_tokenizer = tokenizer_dir
    if recorded_source and tokenizer_dir and tokenizer_dir.startswith(src + os.sep):  # a staged copy: its origin
        shown_tokenizer = storage.join(recorded_source, os.path.relpath(tokenizer_dir, src))
    name = os.path.basename(os.path.abspath(out_dir)) if out_dir else "model"
    card = model_card.model_card(cfg, name=name, step=meta.get("step"), source=recorded_source or src, meta=meta,
                                 metrics=model_card.read_metrics(src, meta.get("step")), tokenizer=shown_tokenizer,
                                 params=_count(params))
    path = to_hf(cfg, params, out_dir, dtype=dtype, shard_size=shard_size, force=force, hf_config=hf_config,
                 tokenizer_dir=tokenizer_dir, card=card)
    return {"out_dir": path, "config": cfg, "step": meta.get("step"), "params": _count(params),
            "files": sorted(os.listdir(path)), "tokenizer_dir": shown_tokenizer}


def _choose_tokenizer(root: str, cfg: Config, meta: dict, side_dir: str | None, override: str | None) -> str | None:
    """The tokenizer an export ships: a directory to copy, "byte", or None (none known).

    1. `override` (--tokenizer DIR or byte), which must be a tokenizer directory;
    2. a from-hf import: its hf_files/ (None if the source had no tokenizer: "byte" there is only the default);
    3. a trained checkpoint: data.tokenizer, the one it was trained with. A recorded directory that is gone is an
       error naming it (the tokenizer cannot be guessed); data.tokenizer=byte on a model initialised from an
       import with its own tokenizer (hf_files/) ships that one, whose vocabulary the model's embedding is.
    """
    if override is not None:
        if override != "byte" and not io.has_tokenizer_files(override):
            state = "holds no tokenizer files" if os.path.isdir(override) else "does not exist"
            raise TokenizerNotFoundError(f"--tokenizer {override} {state}; give a directory with tokenizer.json "
                                         f"(e.g. from `jaxctx tokenizer train`) or byte")
        return override if override == "byte" else os.path.abspath(override)
    side_tokenizer = side_dir if io.has_tokenizer_files(side_dir) else None
    source = meta.get("source")
    if isinstance(source, dict) and source.get("format") == "huggingface":
        return side_tokenizer
    recorded = cfg.data.tokenizer
    if recorded == "byte":
        return side_tokenizer or "byte"
    if io.has_tokenizer_files(recorded):
        return os.path.abspath(recorded)
    state = "holds no tokenizer files" if os.path.isdir(recorded) else "does not exist (moved or deleted?)"
    raise TokenizerNotFoundError(f"{root}: the config records data.tokenizer={recorded}, which {state}; pass "
                                 f"--tokenizer DIR with the tokenizer this model was trained with")


def _with_workdir_labels(cfg: Config, src: str, root: str) -> Config:
    """A task model trained without model.id2label takes its label names from the workdir's labels.json (which the
    training loop writes from the data), so the export's id2label/label2id name the classes, not LABEL_0..."""
    if cfg.model.task == "lm" or cfg.model.id2label is not None:
        return cfg
    from jaxctx.data.labels import LABELS_FILE, load_labels

    path = next((p for p in (os.path.join(src, LABELS_FILE), os.path.join(os.path.dirname(root), LABELS_FILE))
                 if os.path.isfile(p)), None)
    if path is None:
        return cfg
    names = load_labels(path).names
    if len(names) != cfg.model.num_labels:
        raise ConvertError(f"{path} names {len(names)} labels but the checkpoint's model.num_labels is "
                           f"{cfg.model.num_labels}; remove or fix {path}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, id2label=tuple(names)))


def _side_dir(src: str, root: str, cfg: Config) -> str | None:
    """hf_files/ of a from-hf checkpoint: in the checkpoint itself, or in the one a workdir was initialised from."""
    candidates = [os.path.join(root, HF_FILES), os.path.join(src, HF_FILES)]
    if cfg.train.init_from:
        candidates.append(os.path.join(os.path.abspath(cfg.train.init_from), HF_FILES))
    return next((c for c in candidates if os.path.isdir(c)), None)


def _count(params) -> int:
    return int(sum(np.size(x) for x in mapping.flatten(params).values()))
