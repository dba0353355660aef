"""Adaptation options: parsed once from ``BuildConfig.adapt`` (and the heal keys of ``BuildConfig.compression``)
and validated before any heavy work.

The options dict (as the CLI and ``recipe.toml`` spell it)::

    method         dapt | raft     continued pretraining on the document chunks | RAFT fine-tuning on Q/A + sources
    qa_train       raft: JSONL of {"question", "answer", "source"} (source: a document path under --docs)
    qa_teacher     raft: a local .gguf or an OpenAI-compatible http(s)://host:port/v1 endpoint that writes
                   questions with answers from the calibration chunks (builder.adapt.teacher); with qa_train,
                   both sets are used
    qa_teacher_model  the endpoint's model name (default: the first model it serves)
    qa_per_chunk   questions asked per chunk (default 1)
    qa_max         cap on the questions kept from the teacher (default 200)
    teacher        a checkpoint folder to distil from (forward KL on softened logits mixed with next-token loss);
                   its tokenizer must be the student's
    steps          optimizer steps (default 100)
    batch_size     sequences per step (default 4)
    seq_len        DAPT block length in model tokens (default 256; a RAFT example longer than 2 x seq_len is left out)
    lr             AdamW learning rate of the LoRA weights (default 2e-4), cosine schedule, 5% warm-up
    lora_r         LoRA rank (default 16); lora_alpha (default 2 x r)
    kd_alpha       share of the KD term in the loss, in [0, 1] (default 0.5; only with a teacher)
    kd_temperature softening temperature T > 0 (default 2.0)
    raft_k         sources per RAFT prompt, oracle + distractors (default: the bundle's top_k_chunks)
    raft_abstain   share of RAFT examples without the oracle, answered with the abstention phrase (default 0.2)
    raft_hard      how many distractors per RAFT prompt are hard ones (other documents sharing the most question
                   words; default 0: all random, RAFT's own recipe)
    raft_paired    abstaining questions also get their oracle example (default false)
    max_epochs     refuse when the steps would pass over the training text more often than this (default 10)
    threads        CPU threads while training (default 2; results are reproducible for a fixed count)

Everything is a :class:`~fieldpack.shared.errors.AdaptationOptionError` naming the option and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from fieldpack.builder.adapt.teacher import is_endpoint
from fieldpack.shared.errors import AdaptationOptionError, first_validation_error

METHODS = ("dapt", "raft")
#: option key -> the ``fieldpack build`` flag that sets it (for error messages)
FLAGS = {"method": "--adapt", "qa_train": "--qa-train", "teacher": "--distill-from", "steps": "--adapt-steps",
         "lora_r": "--lora-r", "seq_len": "--adapt-seq-len", "lr": "--adapt-lr", "batch_size": "--adapt-batch",
         "qa_teacher": "--qa-teacher", "qa_teacher_model": "--qa-teacher-model", "qa_per_chunk": "--qa-per-chunk",
         "qa_max": "--qa-max", "raft_hard": "--raft-hard", "raft_paired": "--raft-paired",
         "raft_abstain": "--raft-abstain"}


class AdaptOptions(BaseModel):
    """Validated adaptation options (see the module docstring for meanings and defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["dapt", "raft"] | None = None
    qa_train: Path | None = None
    qa_teacher: str | None = None
    qa_teacher_model: str | None = None
    qa_per_chunk: int = 1
    qa_max: int = 200
    teacher: Path | None = None
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 2.0
    raft_k: int | None = None
    raft_abstain: float = 0.2
    raft_hard: int = 0
    raft_paired: bool = False
    max_epochs: float = 10.0
    threads: int = 2

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise AdaptationOptionError(f"adaptation options must be a table, not {type(data).__name__}",
                                  hint='give options such as method = "dapt"')
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise AdaptationOptionError(f"unknown adaptation option(s) {', '.join(unknown)}",
                                  hint=f"use only {', '.join(cls.model_fields)}")
        return {k: v for k, v in data.items() if v is not None}

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> str:
        m = str(v).strip().lower()
        if m not in METHODS:
            raise AdaptationOptionError(f"--adapt {v!r} is not an adaptation method",
                                  hint="use --adapt dapt (continued pretraining) or --adapt raft (Q/A fine-tuning)")
        return m

    @field_validator("qa_teacher", "qa_teacher_model", mode="before")
    @classmethod
    def _text(cls, v: Any, info: Any) -> str:
        if not isinstance(v, (str, Path)) or not str(v).strip():
            raise AdaptationOptionError(f"{_flag(info.field_name)} {v!r} is empty",
                                  hint="give a .gguf file or an http(s)://host:port/v1 URL" if info.field_name ==
                                  "qa_teacher" else "give the name of a model the endpoint serves")
        return str(v).strip()

    @field_validator("steps", "batch_size", "lora_r", "threads", "qa_per_chunk", "qa_max", mode="before")
    @classmethod
    def _positive_int(cls, v: Any, info: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AdaptationOptionError(f"{_flag(info.field_name)} {v!r} must be a whole number >= 1",
                                  hint=f"give {_flag(info.field_name)} a positive whole number")
        return v

    @field_validator("seq_len", mode="before")
    @classmethod
    def _seq_len(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 16:
            raise AdaptationOptionError(f"--adapt-seq-len {v!r} is too short", hint="use at least 16 tokens, e.g. 256")
        return v

    @field_validator("lr", "kd_temperature", "max_epochs", mode="before")
    @classmethod
    def _positive(cls, v: Any, info: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise AdaptationOptionError(f"{_flag(info.field_name)} {v!r} must be a number > 0",
                                  hint=f"give {_flag(info.field_name)} a positive number")
        return float(v)

    @field_validator("raft_hard", mode="before")
    @classmethod
    def _count(cls, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise AdaptationOptionError(f"--raft-hard {v!r} must be a whole number >= 0",
                                  hint="give --raft-hard 0 (random distractors) up to the sources per prompt")
        return v

    @field_validator("raft_paired", mode="before")
    @classmethod
    def _flag_bool(cls, v: Any) -> bool:
        if not isinstance(v, bool):
            raise AdaptationOptionError(f"--raft-paired {v!r} is not true or false", hint="give true or false")
        return v

    @field_validator("kd_alpha", "raft_abstain", mode="before")
    @classmethod
    def _share(cls, v: Any, info: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise AdaptationOptionError(f"{_flag(info.field_name)} {v!r} is outside [0, 1]",
                                  hint=f"give {_flag(info.field_name)} a share such as 0.2")
        return float(v)

    @model_validator(mode="after")
    def _combinations(self) -> "AdaptOptions":
        if self.method is None and self.teacher is None:
            raise AdaptationOptionError("adaptation options without --adapt or --distill-from",
                                  hint="add --adapt dapt|raft or --distill-from TEACHER, or drop the options")
        if self.method == "raft" and self.qa_train is None and self.qa_teacher is None:
            raise AdaptationOptionError("--adapt raft needs training questions, and none were given",
                                  hint="pass --qa-train pairs.jsonl (lines of question, answer, source) or "
                                       "--qa-teacher MODEL.gguf|http://host:port/v1")
        for key in ("qa_train", "qa_teacher"):
            if getattr(self, key) is not None and self.method != "raft":
                raise AdaptationOptionError(f"{_flag(key)} applies to --adapt raft only",
                                      hint=f"add --adapt raft or drop {_flag(key)}")
        if self.qa_teacher_model is not None and not is_endpoint(self.qa_teacher or ""):
            raise AdaptationOptionError("--qa-teacher-model names a model of an endpoint, and --qa-teacher is not one",
                                  hint="drop --qa-teacher-model, or give --qa-teacher http(s)://host:port/v1")
        return self

    @property
    def alpha(self) -> int:
        """LoRA scaling numerator (``lora_alpha``, default 2 x rank)."""
        return self.lora_alpha or 2 * self.lora_r

    @property
    def label(self) -> str:
        """``dapt``, ``raft``, ``dapt+kd``, ``kd`` (distillation alone)."""
        parts = [self.method] if self.method else []
        if self.teacher is not None:
            parts.append("kd")
        return "+".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON/TOML-ready dict, ``None`` dropped, paths as strings (what a recipe stores)."""
        return self.model_dump(mode="json", exclude_none=True)


def _flag(field: str) -> str:
    return FLAGS.get(field, f"adapt option {field}")


def parse_adapt_options(options: dict[str, Any]) -> AdaptOptions:
    """Validate the ``adapt`` options dict (no file or model is read).

    Raises:
        AdaptationOptionError: an unknown key or method, a value out of range, ``--adapt raft`` without
            ``--qa-train``, ``--qa-train`` without ``--adapt raft``.
    """
    try:
        return AdaptOptions.model_validate(options)
    except ValidationError as exc:
        raise AdaptationOptionError(f"adaptation options: {first_validation_error(exc)}",
                              hint="see `fieldpack build --help`") from exc
