"""The build configuration, which is also the recipe: defined once, validated on construction, saved into every
bundle as ``recipe.toml`` and replayed by ``fieldpack build --recipe``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fieldpack.builder.adapt.teacher import is_endpoint
from fieldpack.shared.errors import UsageError, first_validation_error
from fieldpack.shared.manifest import BundleName, BundleVersion

QuantName = str  # validated against builder.quantize.QUANT_TYPES at build time


class BuildConfig(BaseModel):
    """Everything ``fieldpack build`` needs. Paths are made absolute on construction (relative ones against the
    current folder; in a recipe file, against the recipe's folder), so a saved recipe replays from any folder.
    ``name`` and ``version`` follow the manifest's rules, checked here, before any stage runs.

    Sizes: ``chunk_tokens``/``overlap_tokens`` in embedder tokens; ``n_ctx``/``max_tokens`` in model tokens.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local Hugging Face checkpoint folder, or a hub id (fetched only when online)")
    docs: Path = Field(description="folder of documents: .md .txt .html .pdf .csv")
    exclude: list[str] = Field(default_factory=list, description="glob patterns of files/folders under docs that are "
                                                                 "not indexed (builder.ingest.exclude)")
    name: BundleName = Field(description="bundle name, e.g. plant-ops")
    version: BundleVersion = Field(default="0.1.0")
    quant: QuantName = Field(default="Q4_K_M", description="llama.cpp tensor type mix (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, F16)")
    sign: Path = Field(description="ed25519 private key from `fieldpack keygen`")
    output: Path = Field(description="the .fpk to write")
    embd_type: str | None = Field(default=None, description="GGML type of token_embd.weight (Q8_0, Q6_K, Q4_K, ...); "
                                                            "default: the quant mix's choice")
    output_type: str | None = Field(default=None, description="GGML type of output.weight; default: the mix's choice "
                                                              "(tied embeddings: token_embd is the output)")
    trim_vocab: bool = Field(default=False, description="trim the vocabulary to the documents' tokens (builder.trim), "
                                                        "gated against the untrimmed model")
    keep_general: int | None = Field(default=None, ge=0, description="general tokens kept besides the domain's when "
                                                                     "trimming; default builder.trim.DEFAULT_KEEP_GENERAL")
    embedder: Path | None = Field(default=None, description="sentence-transformers folder; default all-MiniLM-L6-v2")
    embedder_int8: bool = Field(default=True, description="ship the int8 ONNX if it passes the quality gate")
    adapt_embedder: bool = Field(default=False, description="fine-tune the embedder on the documents; kept only if "
                                                            "it beats the base one on held-out pseudo-queries")
    embedder_adapt_steps: int = Field(default=200, ge=1, le=100_000, description="training steps of the embedder's "
                                      "adaptation (batch 32)")
    chunk_tokens: int = Field(default=200, ge=32, le=512)
    overlap_tokens: int = Field(default=40, ge=0, le=256)
    n_ctx: int = Field(default=2048, ge=128, description="default context on the device (tokens)")
    max_tokens: int = Field(default=256, ge=8, description="answer length cap (tokens)")
    top_k_chunks: int = Field(default=4, ge=1, le=20)
    min_similarity: float | None = Field(default=None, description="abstention threshold; default from retrieval.search")
    parity_outtype: Literal["f16", "f32"] = Field(default="f16")
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=0.5, description="share of chunks held out for PPL/KLD")
    eval_max_chunks: int = Field(default=64, ge=1)
    seed: int = Field(default=0)
    prompt_format: Literal["chat", "completion"] | None = Field(
        default=None, description="how the device prompts the model; default: decided from the chat template "
                                  "(chat, chat without system role, or completion for a base model)")
    compression: dict[str, Any] = Field(default_factory=dict, description="pruning / imatrix options (see builder.compress)")
    adapt: dict[str, Any] = Field(default_factory=dict, description="LoRA DAPT / RAFT / distillation options "
                                                                    "(see builder.adapt.options)")
    ship_adapter: bool = Field(default=False, description="ship the LoRA as a llama.cpp adapter GGUF beside the "
                                                          "unadapted base model (bundle format 2) instead of merging it")

    @field_validator("docs", "sign", "output", "embedder")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(v).expanduser().absolute()

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, v: list[str]) -> list[str]:
        from fieldpack.builder.ingest.exclude import Excludes

        try:
            return list(Excludes.parse(v).patterns)
        except UsageError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("model")
    @classmethod
    def _model_path(cls, v: str) -> str:
        p = Path(v).expanduser()
        return str(p.absolute()) if p.exists() else v  # a local folder becomes absolute; a hub id stays as is

    @field_validator("adapt")
    @classmethod
    def _adapt_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        out = dict(v)
        for key in _ADAPT_PATH_KEYS:  # files the adaptation reads: absolute, so a recipe replays from anywhere
            if isinstance(out.get(key), (str, Path)) and str(out[key]) and not is_endpoint(out[key]):
                out[key] = str(Path(out[key]).expanduser().absolute())
        return out

    @field_validator("overlap_tokens")
    @classmethod
    def _overlap(cls, v: int, info: Any) -> int:
        ct = info.data.get("chunk_tokens")
        if ct is not None and v >= ct:
            raise ValueError(f"overlap_tokens ({v}) must be smaller than chunk_tokens ({ct})")
        return v

    @model_validator(mode="after")
    def _quantizer_alone(self) -> "BuildConfig":
        """GPTQ/AWQ quantize the checkpoint's own tensors with the mix's types: not with a trimmed vocabulary or
        chosen token_embd/output types (yet)."""
        qz = str(self.compression.get("quantizer") or "rtn").lower()
        mixed = [o for o, on in (("--trim-vocab", self.trim_vocab), ("--embd-type", self.embd_type),
                                 ("--output-type", self.output_type)) if on]
        if qz != "rtn" and mixed:
            raise ValueError(f"--quantizer {qz} is not combined with {', '.join(mixed)} yet. Fix: build with "
                             f"--quantizer rtn, or without {', '.join(mixed)}")
        return self

    @model_validator(mode="after")
    def _ship_adapter(self) -> "BuildConfig":
        """``--ship-adapter`` ships the unadapted base model: it needs ``--adapt`` / ``--distill-from`` and no stage
        that changes the tensors the adapter was trained on (pruning, a calibrated quantizer). Vocabulary trimming
        is allowed: it cuts only the embedding and output rows, which our LoRA does not adapt."""
        if not self.ship_adapter:
            return self
        if not self.adapt:
            raise ValueError("--ship-adapter needs a LoRA to ship. Fix: add --adapt dapt|raft or --distill-from, or "
                             "drop --ship-adapter")
        mixed = [o for o, on in (("--prune", self.compression.get("prune")), ("--heal", self.compression.get("heal")),
                                 ("--quantizer", str(self.compression.get("quantizer") or "rtn").lower() != "rtn"))
                 if on]
        if mixed:
            raise ValueError(f"--ship-adapter is not combined with {', '.join(mixed)} (the adapter is trained on the "
                             f"unpruned base model). Fix: build without {', '.join(mixed)}, or without "
                             "--ship-adapter (the merged model then ships)")
        return self

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> "BuildConfig":
        """Load a recipe TOML; CLI options given explicitly override it. Raises UsageError naming the key."""
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise UsageError(f"recipe {path} does not exist", hint="pass a recipe.toml written by a build") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"recipe {path} is not valid TOML: {exc}", hint="fix the file or rebuild without --recipe") from exc
        data = _relative_to(data.get("build", data), Path(path).expanduser().absolute().parent)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(data, origin=str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], *, origin: str = "options") -> "BuildConfig":
        """Construct and translate pydantic errors into one UsageError line."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            errs = exc.errors()
            if errs and not errs[0]["loc"]:  # a rule across options (a model validator): "problem. Fix: fix"
                problem, _, fix = str(errs[0]["msg"]).replace("Value error, ", "").partition(" Fix: ")
                raise UsageError(problem if origin == "options" else f"{origin}: {problem}",
                                 hint=fix or "see `fieldpack build --help`") from exc
            where = ".".join(str(p) for p in errs[0]["loc"]) if errs else ""
            opt = f"--{where.replace('_', '-')}" if where in _OPTIONS else None
            hint = f"give {opt} a valid value (see `fieldpack build --help`)" if opt else "see `fieldpack build --help`"
            problem, _, fix = first_validation_error(exc).replace("Value error, ", "").partition(" Fix: ")
            raise UsageError(f"{origin}: {problem}", hint=fix or hint) from exc

    def to_recipe(self) -> dict[str, Any]:
        """JSON/TOML-ready dict of this config under a ``build`` table (None values dropped, paths as str)."""
        d = self.model_dump(mode="json", exclude_none=True)
        return {"build": d}

    def recipe_toml(self) -> str:
        """The recipe as TOML text."""
        import tomli_w

        return tomli_w.dumps(self.to_recipe())


#: Fields that are also ``fieldpack build`` options (``--name``, ``--n-ctx``, ...), for error hints.
_OPTIONS = {"model", "docs", "exclude", "quant", "embd_type", "output_type", "keep_general", "name", "version", "sign", "n_ctx",
            "max_tokens", "embedder", "adapt_embedder", "ship_adapter"}
_PATH_KEYS = ("docs", "sign", "output", "embedder", "model")
_ADAPT_PATH_KEYS = ("qa_train", "teacher", "qa_teacher")


def _relative_to(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Resolve relative paths of a recipe against ``base`` (the recipe's folder); a ``model`` that is no
    folder there is kept as given (a hub id)."""
    out = dict(data)
    for key in _PATH_KEYS:
        v = out.get(key)
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            cand = base / v
            if key != "model" or cand.exists():
                out[key] = str(cand)
    adapt = out.get("adapt")
    if isinstance(adapt, dict):
        out["adapt"] = {k: (str(base / v) if k in _ADAPT_PATH_KEYS and isinstance(v, str) and v and not is_endpoint(v)
                            and not Path(v).expanduser().is_absolute() else v) for k, v in adapt.items()}
    return out
