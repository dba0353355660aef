"""Compression options: parsed once from ``BuildConfig.compression`` and validated before any heavy work.

The options dict (as the CLI and ``recipe.toml`` spell it)::

    prune         magnitude | wanda | sparsegpt   (unstructured or N:M masks, stored densely in GGUF)
                  depth                           (drop whole decoder blocks, ShortGPT block influence)
                  width                           (remove MLP channels, optionally whole GQA groups of heads)
    sparsity      share of weights zeroed in (0, 1), for the mask methods (default 0.5 without a pattern)
    pattern       "N:M": at most N non-zeros in every M consecutive input weights of a row (2:4, 4:8)
    drop_layers   depth: decoder blocks to drop (default: a quarter of them, at least 1)
    ffn_keep      width: share of MLP channels kept in (0, 1) (default 0.75), rounded to a multiple of 256 (or 32)
    kv_heads_keep width: KV heads (GQA groups) to keep; each keeps its query heads (default: all)
    imatrix       "domain": importance matrix from the calibration chunks, used by the quantizer
    quantizer     rtn | gptq | awq: how the integers are chosen (:mod:`builder.compress.quantizers`; default rtn,
                  llama.cpp's round-to-nearest)
    calib_chunks  calibration chunks used for pruning / imatrix (default 128)
    calib_seq_len calibration window in model tokens (default 256)
    heal          "kd": after structured pruning, LoRA-train the pruned model to match the unpruned one's logits
                  on the calibration chunks (Minitron-style distillation; builder.adapt)
    heal_steps    optimizer steps of that healing (default 100)

:func:`parse_options` checks what can be checked from the options alone; :func:`check_against_model` adds
what needs the checkpoint's ``config.json`` (architecture, layer count, widths), still without loading weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from fieldpack.shared.errors import CompressionConfigError, CompressionOptionError, first_validation_error

MASK_METHODS = ("magnitude", "wanda", "sparsegpt")
STRUCTURED_METHODS = ("depth", "width")
PRUNE_METHODS = MASK_METHODS + STRUCTURED_METHODS

#: Hugging Face architectures whose decoder blocks we know how to prune (Llama layout: q/k/v/o + gate/up/down).
PRUNABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

#: Architectures whose blocks can be dropped (depth) or whose MLPs can be narrowed (width), but not masked: Gemma 3
#: (text). Its per-layer sliding/global attention pattern follows the kept blocks (``layer_types``, written by our
#: converter as ``gemma3.attention.sliding_window_pattern``); the mask methods' block-by-block driver does not
#: know its decoder layer's call signature (two RoPE tables).
STRUCTURED_ONLY_ARCHITECTURES = ("Gemma3ForCausalLM",)

#: Architectures whose llama.cpp graph accepts ``n_head * head_dim != hidden_size`` (llama.cpp's qwen2 loader
#: requires a square ``attn_q``), so whole GQA groups can be removed.
HEAD_PRUNABLE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

#: K-quants pack 256 values per block along a row; an MLP width that is a multiple of it keeps Q4_K/Q6_K usable.
K_QUANT_BLOCK = 256
#: Q4_0/Q8_0 pack 32; the width rounding falls back to it when the source width is not a multiple of 256.
LEGACY_QUANT_BLOCK = 32

DEFAULT_SPARSITY = 0.5
DEFAULT_FFN_KEEP = 0.75
DEFAULT_CALIB_CHUNKS = 128
DEFAULT_CALIB_SEQ_LEN = 256

_KNOWN_KEYS = {"prune", "sparsity", "pattern", "drop_layers", "ffn_keep", "kv_heads_keep", "imatrix",
               "quantizer", "calib_chunks", "calib_seq_len", "heal", "heal_steps"}
QUANTIZERS = ("rtn", "gptq", "awq")
DEFAULT_HEAL_STEPS = 100
#: options that are a share in (0, 1): the flag named in errors, and the fix
_SHARE_HINTS = {"sparsity": ("--sparsity", "give the share of weights to zero, e.g. 0.5"),
                "ffn_keep": ("--ffn-keep", "give the share of MLP channels to keep, e.g. 0.75")}
_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class CompressionOptions(BaseModel):
    """Validated compression options (see the module docstring for each field's meaning and default).

    A frozen pydantic model: :func:`parse_options` (``model_validate``) checks keys, types and ranges with the
    one-line :class:`CompressionOptionError` messages the CLI shows, and fills the defaults that depend on the
    method. ``pattern`` is ``(n, m)``: at most ``n`` non-zeros kept in every ``m`` consecutive weights of a
    row. ``sparsity`` is the share of weights zeroed in the pruned matrices; for a pattern it is ``(m - n) / m``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    prune: str | None = None
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    drop_layers: int | None = None
    ffn_keep: float | None = None
    kv_heads_keep: int | None = None
    imatrix: str | None = None
    quantizer: str | None = None
    calib_chunks: int = DEFAULT_CALIB_CHUNKS
    calib_seq_len: int = DEFAULT_CALIB_SEQ_LEN
    heal: str | None = None
    heal_steps: int | None = None

    # validators raise CompressionOptionError (not a ValueError), which pydantic lets through unchanged: the
    # first problem is reported in the CLI's words, in the order below (keys, then fields, then combinations)
    @model_validator(mode="before")
    @classmethod
    def _known_keys_and_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise CompressionOptionError(f"compression options must be a table, not {type(data).__name__}",
                                         hint="give options such as prune = \"wanda\"")
        unknown = sorted(set(data) - _KNOWN_KEYS)
        if unknown:
            raise CompressionOptionError(f"unknown compression option(s) {', '.join(unknown)}",
                                         hint=f"use only {', '.join(sorted(_KNOWN_KEYS))}")
        data = {k: v for k, v in data.items() if v is not None}
        prune = str(data.get("prune", "")).strip().lower()
        if prune in MASK_METHODS and data.get("sparsity") is None and data.get("pattern") in (None, ""):
            data["sparsity"] = DEFAULT_SPARSITY
        if prune == "width" and data.get("ffn_keep") is None:
            data["ffn_keep"] = DEFAULT_FFN_KEEP
        if data.get("heal") not in (None, False, "") and data.get("heal_steps") is None:
            data["heal_steps"] = DEFAULT_HEAL_STEPS
        return data

    @field_validator("prune", mode="before")
    @classmethod
    def _prune(cls, v: Any) -> str | None:
        method = str(v).strip().lower()
        if method not in PRUNE_METHODS:
            raise CompressionOptionError(f"--prune {v!r} is not a pruning method",
                                         hint=f"use one of {', '.join(PRUNE_METHODS)}")
        return method

    @field_validator("sparsity", "ffn_keep", mode="before")
    @classmethod
    def _share(cls, v: Any, info: ValidationInfo) -> float:
        v = _number(info.field_name, v, float)
        if not 0.0 < v < 1.0:
            flag, hint = _SHARE_HINTS[info.field_name]
            raise CompressionOptionError(f"{flag} {v} is outside (0, 1)", hint=hint)
        return v

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v: Any) -> tuple[int, int] | None:
        if v == "":
            return None
        return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) and len(v) == 2 else parse_pattern(v)

    @field_validator("drop_layers", mode="before")
    @classmethod
    def _drop_layers(cls, v: Any) -> int:
        return _at_least("drop_layers", _number("drop_layers", v, int), 1, f"--drop-layers {v} must be at least 1",
                         "give how many decoder blocks to drop")

    @field_validator("kv_heads_keep", mode="before")
    @classmethod
    def _kv_heads_keep(cls, v: Any) -> int:
        return _at_least("kv_heads_keep", _number("kv_heads_keep", v, int), 1,
                         f"kv_heads_keep={v} would leave attention without heads", "keep at least 1 KV head")

    @field_validator("imatrix", mode="before")
    @classmethod
    def _imatrix(cls, v: Any) -> str | None:
        if v in (False, ""):
            return None
        if v is True or str(v).lower() == "domain":
            return "domain"
        raise CompressionOptionError(f"--imatrix {v!r} is not supported",
                                     hint="use --imatrix domain (importance matrix from your documents)")

    @field_validator("quantizer", mode="before")
    @classmethod
    def _quantizer(cls, v: Any) -> str | None:
        name = str(v).strip().lower()
        if name not in QUANTIZERS:
            raise CompressionOptionError(f"--quantizer {v!r} is not a quantizer", hint=f"use one of {', '.join(QUANTIZERS)}")
        return None if name == "rtn" else name

    @field_validator("heal", mode="before")
    @classmethod
    def _heal(cls, v: Any) -> str | None:
        if v in (False, ""):
            return None
        if str(v).lower() == "kd":
            return "kd"
        raise CompressionOptionError(f"--heal {v!r} is not a healing method",
                                     hint="use --heal kd (distil the pruned model from the unpruned one)")

    @field_validator("heal_steps", mode="before")
    @classmethod
    def _heal_steps(cls, v: Any) -> int:
        return _at_least("heal_steps", _number("heal_steps", v, int), 1, f"--heal-steps {v} must be at least 1",
                         "give how many optimizer steps to heal for, e.g. 100")

    @field_validator("calib_chunks", mode="before")
    @classmethod
    def _calib_chunks(cls, v: Any) -> int:
        return _at_least("calib_chunks", _number("calib_chunks", v, int), 1,
                         f"--calib-chunks {v} must be at least 1",
                         "give how many document chunks to calibrate on, e.g. 128")

    @field_validator("calib_seq_len", mode="before")
    @classmethod
    def _calib_seq_len(cls, v: Any) -> int:
        return _at_least("calib_seq_len", _number("calib_seq_len", v, int), 16, f"calib_seq_len={v} is too short",
                         "use at least 16 tokens")

    @model_validator(mode="after")
    def _combinations(self) -> "CompressionOptions":
        if self.sparsity is not None and self.pattern is not None:
            raise CompressionOptionError("--sparsity and --pattern were both given",
                                         hint="an N:M pattern fixes the sparsity ((M-N)/M); give one of them")
        if self.prune not in MASK_METHODS:
            for k in ("sparsity", "pattern"):
                if getattr(self, k) is not None:
                    raise CompressionOptionError(
                        f"--{k} applies to --prune magnitude|wanda|sparsegpt, not to "
                        f"{'no pruning' if self.prune is None else '--prune ' + self.prune}",
                        hint=f"drop --{k} or choose a mask method")
        if self.prune != "depth" and self.drop_layers is not None:
            raise CompressionOptionError("--drop-layers applies to --prune depth only",
                                         hint="add --prune depth or drop it")
        if self.quantizer is not None and self.prune is not None:
            raise CompressionOptionError(f"--quantizer {self.quantizer} is not combined with --prune yet",
                                         hint="build without --prune, or with --quantizer rtn")
        if self.heal is not None and self.prune not in STRUCTURED_METHODS:
            raise CompressionOptionError("--heal applies to --prune depth|width (structured pruning)",
                                         hint="add --prune depth or --prune width, or drop --heal")
        if self.heal_steps is not None and self.heal is None:
            raise CompressionOptionError("--heal-steps needs --heal kd", hint="add --heal kd or drop --heal-steps")
        if self.prune != "width" and (self.ffn_keep is not None or self.kv_heads_keep is not None):
            raise CompressionOptionError("--ffn-keep / kv_heads_keep apply to --prune width only",
                                         hint="add --prune width or drop them")
        return self

    @field_serializer("pattern")
    def _pattern_text(self, v: tuple[int, int] | None) -> str | None:
        return f"{v[0]}:{v[1]}" if v is not None else None

    @property
    def target_sparsity(self) -> float | None:
        """Share of weights the mask methods zero: ``sparsity``, or ``(m - n) / m`` for an N:M pattern."""
        if self.pattern is not None:
            n, m = self.pattern
            return (m - n) / m
        return self.sparsity

    @property
    def label(self) -> str:
        """Short human label: ``wanda 50%``, ``sparsegpt 2:4``, ``depth -1 blocks``, ``width ffn 0.75``."""
        if self.prune in MASK_METHODS:
            what = f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else f"{(self.sparsity or 0) * 100:g}%"
            return f"{self.prune} {what}"
        if self.prune == "depth":
            return f"depth -{self.drop_layers} blocks" if self.drop_layers else "depth -25% blocks"
        if self.prune == "width":
            return f"width ffn {self.ffn_keep:g}" + (f" kv {self.kv_heads_keep}" if self.kv_heads_keep else "")
        return "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready dict with ``None`` dropped and the pattern as ``"N:M"`` (what a recipe stores)."""
        return self.model_dump(mode="json", exclude_none=True)


def _number(key: str, v: Any, kind: type) -> Any:
    """``v`` as ``kind`` (int or float); an integral float passes as an int; bools and text are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        if kind is int and isinstance(v, float) and v.is_integer():
            return int(v)
        raise CompressionOptionError(f"compression option {key}={v!r} is not {'a number' if kind is float else 'an integer'}",
                                     hint=f"give --{key.replace('_', '-')} a {'number' if kind is float else 'whole number'}")
    return kind(v)


def _at_least(key: str, v: int, low: int, message: str, hint: str) -> int:
    if v < low:
        raise CompressionOptionError(message, hint=hint)
    return v


def parse_pattern(text: str) -> tuple[int, int]:
    """Parse ``"N:M"`` (N non-zeros kept in every M weights). Raises CompressionOptionError unless 0 < N < M."""
    m = _PATTERN_RE.match(str(text))
    if not m:
        raise CompressionOptionError(f"--pattern {text!r} is not of the form N:M",
                                     hint="use a semi-structured pattern such as 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise CompressionOptionError(f"--pattern {text!r} needs 0 < N < M (N weights kept in every M)",
                                     hint="use 2:4 (50% sparse) or 4:8")
    return n, mm


def parse_options(options: dict[str, Any]) -> CompressionOptions:
    """Validate the compression options dict without touching the model.

    Raises:
        CompressionOptionError: an unknown key or method; sparsity outside (0, 1); a pattern that is not N:M
            with 0 < N < M; sparsity and pattern together; an option that does not apply to the method
            (e.g. ``--sparsity`` with ``--prune depth``); ``drop_layers`` < 1; ``ffn_keep`` outside (0, 1);
            ``calib_chunks`` < 1; ``imatrix`` other than ``"domain"``; a quantizer other than rtn/gptq/awq, or
            gptq/awq with pruning.
    """
    try:
        return CompressionOptions.model_validate(options)
    except ValidationError as exc:  # a shape the field validators do not cover
        raise CompressionOptionError(f"compression option {first_validation_error(exc)}",
                                     hint="see the compression options in `fieldpack build --help`") from exc


@dataclass(frozen=True)
class ModelShape:
    """What pruning needs from a checkpoint's ``config.json`` (no weights loaded)."""

    architecture: str
    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    max_positions: int


def read_model_shape(model_dir: Path) -> ModelShape:
    """Read :class:`ModelShape` from ``model_dir/config.json``.

    Raises:
        CompressionConfigError: no readable config.json, or an architecture we cannot prune (named).
    """
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompressionConfigError(f"cannot read {path} to plan pruning: {exc}",
                                     hint="pass a local Hugging Face checkpoint folder") from exc
    archs = cfg.get("architectures") or [cfg.get("model_type", "unknown")]
    arch = str(archs[0])
    if arch not in PRUNABLE_ARCHITECTURES + STRUCTURED_ONLY_ARCHITECTURES:
        raise CompressionConfigError(f"cannot prune architecture {arch} ({path})",
                                     hint=f"pruning supports {', '.join(PRUNABLE_ARCHITECTURES)} (and --prune "
                                          f"depth|width on {', '.join(STRUCTURED_ONLY_ARCHITECTURES)}); "
                                          "build without --prune (quantization and --imatrix still work)")
    try:
        n_head = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelShape(
            architecture=arch, n_layer=int(cfg["num_hidden_layers"]), hidden=hidden,
            intermediate=int(cfg["intermediate_size"]), n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or hidden // n_head),
            max_positions=int(cfg.get("max_position_embeddings") or 2048))
    except (KeyError, TypeError, ValueError) as exc:
        raise CompressionConfigError(f"{path} lacks a field pruning needs: {exc}",
                                     hint="pass an unmodified Hugging Face checkpoint") from exc


def resolve_drop_layers(opts: CompressionOptions, shape: ModelShape) -> int:
    """Blocks to drop: the option, or a quarter of the blocks (at least 1)."""
    return opts.drop_layers if opts.drop_layers is not None else max(1, round(shape.n_layer * 0.25))


def _round_units(x: float) -> int:
    """Nearest whole number, ties towards the smaller one."""
    return int(x) + (1 if x - int(x) > 0.5 else 0)


def resolve_ffn_width(ffn_keep: float, intermediate: int) -> int:
    """MLP width after width pruning: ``ffn_keep * intermediate`` rounded to the nearest multiple of 256 (ties
    towards the smaller width), so K-quants apply to ``ffn_down`` whose rows are this long; when that rounds to
    0 or to the full width, to the nearest multiple of 32 (Q8_0/Q4_0 blocks) instead.

    Raises:
        CompressionOptionError: the width rounds to 0 (empty MLP) or to the full width (nothing pruned) at
            both granularities.
    """
    for block in (K_QUANT_BLOCK, LEGACY_QUANT_BLOCK):
        width = _round_units(ffn_keep * intermediate / block) * block
        if 0 < width < intermediate:
            return width
    if width <= 0:
        raise CompressionOptionError(
            f"--ffn-keep {ffn_keep:g} of {intermediate} MLP channels rounds to 0 (widths are kept multiples of "
            f"{LEGACY_QUANT_BLOCK} so quantization blocks fit) and would leave each MLP empty",
            hint=f"keep at least {LEGACY_QUANT_BLOCK / intermediate:.3g} of the channels")
    raise CompressionOptionError(
        f"--ffn-keep {ffn_keep:g} of {intermediate} MLP channels rounds back to {intermediate} (multiples of "
        f"{LEGACY_QUANT_BLOCK}): nothing would be pruned",
        hint=f"keep at most {(intermediate - LEGACY_QUANT_BLOCK) / intermediate:.3g} of the channels")


def check_against_model(opts: CompressionOptions, shape: ModelShape) -> None:
    """Checks that need the model's shape.

    Raises:
        CompressionOptionError: dropping >= the number of blocks; an MLP width or a KV-head count that would
            leave a layer empty or prune nothing.
    """
    if opts.prune in MASK_METHODS and shape.architecture in STRUCTURED_ONLY_ARCHITECTURES:
        raise CompressionOptionError(f"--prune {opts.prune} does not support {shape.architecture} yet",
                                     hint="use --prune depth or --prune width for it")
    if opts.prune == "depth":
        n = resolve_drop_layers(opts, shape)
        if n >= shape.n_layer:
            raise CompressionOptionError(
                f"--drop-layers {n} would drop every decoder block of this {shape.n_layer}-block model",
                hint=f"drop at most {shape.n_layer - 1}")
    if opts.prune == "width":
        resolve_ffn_width(opts.ffn_keep or DEFAULT_FFN_KEEP, shape.intermediate)
        if (opts.kv_heads_keep is not None and opts.kv_heads_keep < shape.n_head_kv
                and shape.architecture not in HEAD_PRUNABLE_ARCHITECTURES):
            raise CompressionOptionError(
                f"cannot remove attention heads of {shape.architecture}: llama.cpp's graph for it needs "
                "n_head * head_dim == hidden_size",
                hint=f"drop kv_heads_keep (MLP width pruning still works); head pruning supports "
                     f"{', '.join(HEAD_PRUNABLE_ARCHITECTURES)}")
        if opts.kv_heads_keep is not None and opts.kv_heads_keep > shape.n_head_kv:
            raise CompressionOptionError(
                f"kv_heads_keep={opts.kv_heads_keep} exceeds the model's {shape.n_head_kv} KV heads",
                hint=f"keep between 1 and {shape.n_head_kv}")
