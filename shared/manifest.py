"""The bundle manifest (``manifest.json``): schema, parsing and canonical serialisation.

The manifest is the one document a device trusts after checking its signature: it names every other member
with its size and sha256, says what the model and embedder are, what memory the bundle needs at the default
context, how to smoke-test it after install, how it was built, and how good it measured.

Models are pydantic v2 with ``extra="forbid"``: an unknown or missing key is a :class:`ManifestError`, never a
silent default. Serialisation is canonical (sorted keys, UTF-8, no NaN) so the signed bytes are reproducible.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.errors import ManifestError, UnsupportedFormatVersion, first_validation_error

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,31}$")


def check_bundle_name(v: str) -> str:
    """The manifest's rule for a bundle name (1-64 of letters, digits, ``. _ -``, starting alphanumeric).

    Returns ``v``; raises ValueError (pydantic validators and the builder's early check both use this)."""
    if not _NAME.match(v):
        raise ValueError(f"name {v!r} must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return v


def check_bundle_version(v: str) -> str:
    """The manifest's rule for a bundle version (1-32 of letters, digits, ``. + _ -``). Returns ``v`` or raises
    ValueError."""
    if not _VERSION.match(v):
        raise ValueError(f"version {v!r} must be 1-32 characters of letters, digits, '.', '+', '_' or '-', starting "
                         "with a letter or digit")
    return v


BundleName = Annotated[str, AfterValidator(check_bundle_name)]
"""A ``str`` field holding a bundle name, checked by :func:`check_bundle_name` (manifest and build config)."""
BundleVersion = Annotated[str, AfterValidator(check_bundle_version)]
"""A ``str`` field holding a bundle version, checked by :func:`check_bundle_version`."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Member(_Strict):
    """One archive member: relative POSIX path, size in bytes, lowercase hex sha256."""

    name: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return v


class ModelInfo(_Strict):
    """The language model as converted and quantized.

    ``tensor_types`` maps GGML type names (``"Q4_K"``, ``"F32"`` ...) to the number of tensors written with that
    type; ``file_type`` is the requested llama.cpp ftype name (``"Q4_K_M"``). Token ids are model vocab ids;
    ``eot_id`` is the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``) or ``None`` when the model has none.
    """

    architecture: str
    parameter_count: int = Field(ge=1)
    file_type: str
    tensor_types: dict[str, int]
    n_ctx_train: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    n_layer: int = Field(ge=1)
    n_head: int = Field(ge=1)
    n_head_kv: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    chat_template_present: bool
    bos_id: int | None
    eos_id: int
    eot_id: int | None
    tokenizer_model: str
    tokenizer_pre: str | None = None
    source: str = Field(description="checkpoint folder name or hub id the model came from")


class AdapterInfo(_Strict):
    """A LoRA adapter shipped beside the base model (``fieldpack build --ship-adapter``, bundle format 2).

    ``member`` is the archive member holding it (a llama.cpp adapter GGUF: ``general.type = "adapter"``, per adapted
    tensor ``<name>.lora_a`` (r x in) and ``<name>.lora_b`` (out x r)); the device passes it to llama.cpp as
    ``lora_path`` with ``scale``, which adds ``scale * (alpha / rank) * B @ (A @ x)`` to each adapted layer's
    output (Hu et al. 2021, "LoRA", eq. 3). ``check_kld_mean`` (nats/token) and ``check_top1_agreement`` come from
    the build's adapter check: the F16/F32 base GGUF + this adapter against the merged adapted GGUF on held-out
    windows. ``size_bytes``: the member's size.
    """

    member: str
    method: str
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    scale: float = Field(gt=0)
    tensors: int = Field(ge=2)
    size_bytes: int = Field(ge=1)
    check_kld_mean: float = Field(ge=0)
    check_top1_agreement: float = Field(ge=0, le=1)


class EmbedderInfo(_Strict):
    """The sentence embedder shipped as ONNX: output (batch, dimension) float32."""

    name: str
    dimension: int = Field(ge=1)
    pooling: Literal["mean", "cls"]
    normalized: bool
    max_tokens: int = Field(ge=8)
    precision: Literal["fp32", "int8"]


class IndexInfo(_Strict):
    """The document index: counts, vector metric and the chunking that made it (sizes in embedder tokens).

    ``skipped_files`` counts every file under ``--docs`` that is not indexed: skipped by ingest (hidden,
    unsupported, empty, binary, undecodable) and left out by ``--exclude`` (the build prints the two apart; the
    patterns are in the bundle's ``recipe.toml``).
    """

    documents: int = Field(ge=1)
    chunks: int = Field(ge=1)
    metric: Literal["cosine"]
    chunk_tokens: int = Field(ge=16)
    overlap_tokens: int = Field(ge=0)
    skipped_files: int = Field(ge=0)


class MemoryNeeds(_Strict):
    """Resident memory the bundle needs at ``RuntimeDefaults.n_ctx`` (bytes)."""

    weights_bytes: int = Field(ge=0)
    kv_cache_bytes: int = Field(ge=0)
    embedder_bytes: int = Field(ge=0)
    index_bytes: int = Field(ge=0)
    overhead_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _sum(self) -> "MemoryNeeds":
        parts = (self.weights_bytes + self.kv_cache_bytes + self.embedder_bytes + self.index_bytes
                 + self.overhead_bytes)
        if parts != self.total_bytes:
            raise ValueError(f"total_bytes {self.total_bytes} != sum of parts {parts}")
        return self


class RuntimeDefaults(_Strict):
    """How the device runs the model by default. ``n_ctx`` and ``max_tokens`` in tokens.

    ``prompt_format`` (see :mod:`shared.prompt_format`): ``chat`` (the model's chat template with a system turn;
    the default, so bundles built before the field existed read as they ran), ``chat-no-system`` (instructions
    folded into the first user turn), or ``completion`` (plain-text ``completion_template`` for base models,
    cut by the ``stop`` strings).
    """

    n_ctx: int = Field(ge=64)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_k_chunks: int = Field(ge=1)
    stop: list[str]
    min_similarity: float = Field(ge=-1.0, le=1.0, description="abstain below this cosine similarity")
    memory: MemoryNeeds
    prompt_format: Literal["chat", "chat-no-system", "completion"] = "chat"
    completion_template: str | None = Field(default=None, description="prompt text for prompt_format completion")

    @model_validator(mode="after")
    def _template(self) -> "RuntimeDefaults":
        if self.prompt_format == "completion":
            if not self.completion_template:
                raise ValueError("prompt_format completion needs a completion_template")
            missing = [k for k in ("{sources}", "{question}") if k not in self.completion_template]
            if missing:
                raise ValueError(f"completion_template lacks {', '.join(missing)}")
        return self


class SmokeTest(_Strict):
    """Post-install check: retrieving ``question`` must return ``expected_source`` in the top ``k``."""

    question: str
    expected_source: str
    k: int = Field(default=5, ge=1)


class Quality(_Strict):
    """Measured quality figures. Free-form per stage, but each stage is a flat mapping of metric -> number/str.

    Keys used by the builder: ``parity`` (HF vs GGUF), ``quantization`` (ΔPPL, KLD vs the f16 GGUF on held-out
    document chunks), ``embedder`` (fp32 vs int8 gate), ``stages`` (the compression report, one row a stage),
    ``adaptation`` (one row per training run: LoRA DAPT/RAFT/distillation, or healing after pruning: held-out PPL
    and KLD before/after, training tokens, steps, seconds, data sha256).
    """

    parity: dict[str, Any]
    quantization: dict[str, Any] | None = None
    embedder: dict[str, Any] | None = None
    stages: list[dict[str, Any]] = Field(default_factory=list)
    adaptation: list[dict[str, Any]] = Field(default_factory=list)


class Manifest(_Strict):
    """Top-level manifest. See :mod:`shared.bundle_format` for the archive around it."""

    format: Literal["fieldpack-bundle"] = fmt.FORMAT_NAME
    format_version: int
    name: BundleName
    version: BundleVersion
    builder_version: str
    created_at: datetime
    members: list[Member]
    model: ModelInfo
    embedder: EmbedderInfo
    index: IndexInfo
    runtime: RuntimeDefaults
    smoke: SmokeTest
    recipe: dict[str, Any]
    quality: Quality
    adapter: AdapterInfo | None = None  # format 2: a LoRA adapter the device applies on top of model.gguf

    @model_validator(mode="after")
    def _members(self) -> "Manifest":
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("duplicate member names")
        missing = [n for n in fmt.REQUIRED_MEMBERS if n not in names]
        if missing:
            raise ValueError(f"required members missing: {', '.join(missing)}")
        for n in names:
            if n in (fmt.MANIFEST_NAME, fmt.SIGNATURE_NAME):
                raise ValueError(f"member {n} may not list itself")
        if self.adapter is not None:
            if self.format_version < fmt.ADAPTER_FORMAT_VERSION:
                raise ValueError(f"adapter needs format_version {fmt.ADAPTER_FORMAT_VERSION}, not "
                                 f"{self.format_version}")
            if self.adapter.member not in names:
                raise ValueError(f"adapter member {self.adapter.member!r} is not among the members")
        elif fmt.ADAPTER_NAME in names:
            raise ValueError(f"member {fmt.ADAPTER_NAME} is present but the manifest has no adapter entry")
        return self

    @property
    def label(self) -> str:
        """``"name@version"``."""
        return f"{self.name}@{self.version}"

    def member(self, name: str) -> Member:
        """The member called ``name``. Raises ManifestError if absent."""
        for m in self.members:
            if m.name == name:
                return m
        raise ManifestError(f"manifest has no member {name!r}", hint="rebuild the bundle")

    def to_bytes(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys, 2-space indent): the exact bytes that get signed."""
        data = self.model_dump(mode="json")
        if data.get("adapter") is None:  # format 1 manifests stay byte-identical to what format-1 readers accept
            data.pop("adapter", None)
        return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (canonical manifests carry no NaN or Infinity)")


def parse_manifest(data: bytes, *, origin: str = "manifest.json") -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        ManifestError: not UTF-8 JSON (NaN/Infinity included), or a key is missing, unknown or of the wrong type (names the first one).
        UnsupportedFormatVersion: ``format_version`` is not one this reader supports.
    """
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, NaN/Infinity
        raise ManifestError(f"{origin} is not valid UTF-8 JSON: {exc}", hint="rebuild the bundle") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"{origin} is not a JSON object", hint="rebuild the bundle")
    if raw.get("format") != fmt.FORMAT_NAME:
        raise ManifestError(f"{origin} is not a fieldpack manifest (format={raw.get('format')!r})",
                            hint="pass a bundle made by `fieldpack build`")
    version = raw.get("format_version")
    if version not in fmt.SUPPORTED_FORMAT_VERSIONS:
        raise UnsupportedFormatVersion(
            f"{origin} has format_version {version!r}; this fieldpack reads "
            f"{', '.join(map(str, sorted(fmt.SUPPORTED_FORMAT_VERSIONS)))}",
            hint="install a fieldpack version that matches the builder, or rebuild the bundle with this one",
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{origin}: {first_validation_error(exc)}", hint="rebuild the bundle with `fieldpack build`") from exc
