"""The one error hierarchy of fieldpack.

Every error the product raises on purpose derives from :class:`FieldpackError`. Foreign libraries' errors
(tarfile, cryptography, llama.cpp, apsw, paho, ...) are translated into one of these at the boundary where
they are caught, with ``raise ... from exc``. The CLI and the daemon turn a ``FieldpackError`` into one line
(``str(err)``) and the exit code given by :attr:`FieldpackError.exit_code`, each in one place.

::

    FieldpackError
    ├── UsageError                      bad argument or path given by the user          (exit 2)
    │   ├── InputNotFoundError
    │   └── OutputNotWritableError
    ├── SigningKeyError                 key file missing, unreadable or the wrong type  (exit 3)
    ├── BundleError                     a .fpk that cannot be trusted or read           (exit 4)
    │   ├── BundleFormatError           not an archive, truncated, members out of order
    │   ├── UnsupportedFormatVersion
    │   ├── ManifestError               manifest.json fails its schema
    │   ├── SignatureError              unsigned, bad signature, or untrusted key
    │   ├── IntegrityError              a member's size or sha256 does not match
    │   └── UnsafeMemberError           a member would escape the slot (absolute, .., link)
    ├── BuildError                      the builder cannot produce a bundle             (exit 5)
    │   ├── ModelLoadError
    │   ├── UnsupportedArchitectureError
    │   ├── UnsupportedTokenizerError
    │   ├── ParityError                 HF and GGUF disagree beyond tolerance
    │   ├── TrimError                   too few documents to trim the vocabulary, or the trim gate failed
    │   ├── QuantizationError
    │   ├── IngestError / NoDocumentsError
    │   ├── EmbedderError
    │   ├── CompressionConfigError      pruning/sparsity/calibration that cannot work on this model or data
    │   ├── AdaptationError             LoRA/DAPT/RAFT/distillation inputs that cannot work
    │   ├── ChatTemplateError           the prompt format cannot be decided / the chat template fails
    │   └── BuildOptionError            a build option as given is wrong: also a UsageError  (exit 2)
    │       ├── UnknownQuantTypeError
    │       ├── CompressionOptionError  (also a CompressionConfigError)
    │       └── AdaptationOptionError   (also an AdaptationError)
    ├── DeviceError                     the device cannot install or serve              (exit 6)
    │   ├── NotInitializedError
    │   ├── InstallInProgressError
    │   ├── InsufficientResourcesError  disk or RAM below what the bundle needs
    │   ├── SlotCheckError              post-unpack check failed; previous bundle stays active
    │   ├── NoActiveBundleError
    │   ├── NoPreviousBundleError
    │   ├── RuntimeLoadError
    │   ├── DowngradeError              older version or other bundle name than the active one
    │   └── ShuttingDownError           the daemon stopped before answering (queued or running)
    ├── QueryError                      a question that cannot be answered as asked     (exit 7)
    │   ├── EmptyQuestionError
    │   └── QuestionTooLongError
    │   (MaxTokensError: an answer cap that leaves the prompt too little of n_ctx; a UsageError, exit 2)
    └── ProtocolError                   a wire message that breaks shared.protocol      (exit 8)

Each error carries ``hint``: what the user should do. ``str(err)`` is ``"<message>. Fix: <hint>"`` on one line.
"""

from __future__ import annotations


class FieldpackError(Exception):
    """Base of every deliberate fieldpack error.

    Args:
        message: what went wrong, naming the input (a path, an option, a member).
        hint: how to fix it; optional, appended to ``str(err)`` as ``"Fix: ..."``.

    Attributes:
        exit_code: process exit status the CLI uses for this class (int, 1..255).
        code: short stable machine-readable code (``snake_case``), used in wire error replies.
    """

    exit_code: int = 1
    code: str = "error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = " ".join(self.message.split())
        if self.hint:
            text = f"{text.rstrip('.')}. Fix: {' '.join(self.hint.split())}"
        return text


# --- usage -------------------------------------------------------------------------------------------------
class UsageError(FieldpackError):
    exit_code = 2
    code = "usage"


class MaxTokensError(UsageError):
    """An answer length cap (``max_tokens``) that leaves the prompt too little of the context.

    ``str(err)`` words it for the CLI (``--max-tokens``); :meth:`api_message` for the HTTP API's ``max_tokens``
    field, so each surface names the input its user actually gave.

    Args:
        requested: the cap asked for (tokens).
        allowed: the largest cap that fits (tokens; may be below 1 when nothing fits).
        why: what the cap must leave room for, e.g. ``"leaves less than 64 of n_ctx 2048 tokens for the question
            and sources"``.
        cli_hint: the CLI's fix (default: ``use --max-tokens <allowed> or less``).
    """

    code = "max_tokens_too_large"

    def __init__(self, requested: int, allowed: int, why: str, cli_hint: str | None = None) -> None:
        super().__init__(f"--max-tokens {requested} {why}", hint=cli_hint or f"use --max-tokens {allowed} or less")
        self.requested, self.allowed, self.why = requested, allowed, why

    def api_message(self) -> str:
        """The same error for an HTTP client: ``max_tokens N <why>. Fix: send max_tokens <allowed> or less``."""
        fix = f"send max_tokens {self.allowed} or less" if self.allowed >= 1 else "send a shorter prompt"
        return str(FieldpackError(f"max_tokens {self.requested} {self.why}", hint=fix))


class InputNotFoundError(UsageError):
    code = "input_not_found"


class OutputNotWritableError(UsageError):
    code = "output_not_writable"


# --- keys --------------------------------------------------------------------------------------------------
class SigningKeyError(FieldpackError):
    exit_code = 3
    code = "signing_key"


# --- bundle ------------------------------------------------------------------------------------------------
class BundleError(FieldpackError):
    exit_code = 4
    code = "bundle"


class BundleFormatError(BundleError):
    code = "bundle_format"


class UnsupportedFormatVersion(BundleError):
    code = "unsupported_format_version"


class ManifestError(BundleError):
    code = "manifest"


class SignatureError(BundleError):
    code = "signature"


class IntegrityError(BundleError):
    code = "integrity"


class UnsafeMemberError(BundleError):
    code = "unsafe_member"


# --- build -------------------------------------------------------------------------------------------------
class BuildError(FieldpackError):
    exit_code = 5
    code = "build"


class ModelLoadError(BuildError):
    code = "model_load"


class UnsupportedArchitectureError(BuildError):
    code = "unsupported_architecture"


class UnsupportedTokenizerError(BuildError):
    code = "unsupported_tokenizer"


class BuildOptionError(BuildError, UsageError):
    """A build option, or a combination of options, that is wrong as given: an unknown name, a value out of
    range, an option that needs another, or one the input model cannot take (dropping more blocks than it has).
    A usage mistake, so it exits 2 like every other one (README: one exit code per family) and is raised before
    any work; it is still a :class:`BuildError` for code that catches the builder's family."""

    exit_code = 2


class UnknownQuantTypeError(BuildOptionError):
    code = "unknown_quant_type"


class ParityError(BuildError):
    code = "parity"


class QuantizationError(BuildError):
    code = "quantization"


class TrimError(BuildError):
    """Vocabulary trimming refused its input (too few documents) or its gate failed."""

    code = "trim"


class IngestError(BuildError):
    code = "ingest"


class NoDocumentsError(IngestError):
    code = "no_documents"


class EmbedderError(BuildError):
    code = "embedder"


class CompressionConfigError(BuildError):
    code = "compression_config"


class CompressionOptionError(CompressionConfigError, BuildOptionError):
    """A pruning/sparsity/calibration/quantizer option that is wrong as given (exit 2, see
    :class:`BuildOptionError`)."""


class AdaptationError(BuildError):
    """Domain adaptation (LoRA continued pretraining, RAFT fine-tuning, distillation, healing) cannot run as
    asked: a QA file with missing fields, a source not among the documents, too little text for the steps, a
    teacher with another tokenizer, an architecture without the LoRA target modules."""

    code = "adaptation"


class AdaptationOptionError(AdaptationError, BuildOptionError):
    """An ``--adapt`` / ``--distill-from`` / RAFT option that is wrong as given (exit 2, see
    :class:`BuildOptionError`)."""


class ChatTemplateError(BuildError):
    """A model's chat template does not compile or render, or the prompt format cannot be decided. The device
    translates it into its own family (RuntimeLoadError / SlotCheckError) where it meets one."""

    code = "chat_template"


# --- device ------------------------------------------------------------------------------------------------
class DeviceError(FieldpackError):
    exit_code = 6
    code = "device"


class NotInitializedError(DeviceError):
    code = "not_initialized"


class InstallInProgressError(DeviceError):
    code = "install_in_progress"


class InsufficientResourcesError(DeviceError):
    code = "insufficient_resources"


class SlotCheckError(DeviceError):
    code = "slot_check"


class NoActiveBundleError(DeviceError):
    code = "no_active_bundle"


class NoPreviousBundleError(DeviceError):
    code = "no_previous_bundle"


class RuntimeLoadError(DeviceError):
    code = "runtime_load"


class ShuttingDownError(DeviceError):
    code = "shutting_down"


class ActiveSlotError(DeviceError):
    """The slot asked for holds the active bundle, which cannot be removed (install or roll back first)."""

    code = "active_slot"


class DowngradeError(DeviceError):
    """An older version, or another bundle name, than the active one (``install --allow-downgrade`` to force)."""

    code = "downgrade"


# --- query -------------------------------------------------------------------------------------------------
class QueryError(FieldpackError):
    exit_code = 7
    code = "query"


class EmptyQuestionError(QueryError):
    code = "empty_question"


class QuestionTooLongError(QueryError):
    code = "question_too_long"


# --- wire --------------------------------------------------------------------------------------------------
class ProtocolError(FieldpackError):
    """A wire message that breaks :mod:`shared.protocol`; ``code`` is sent in the error reply."""

    exit_code = 8
    code = "protocol"

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, hint)
        if code is not None:
            self.code = code


def first_validation_error(exc: Exception, *, top: str = "(top level)") -> str:
    """``"<where>: <message>"`` for the first problem a pydantic ``ValidationError`` reports, e.g.
    ``"runtime.n_ctx: Input should be greater than 0"``; ``top`` names the location of an error on the object
    itself. Used wherever a schema failure becomes one of the errors above (manifest, wire payloads, build
    options), so they all read alike."""
    errs = exc.errors() if hasattr(exc, "errors") else []
    if not errs:
        return str(exc)
    first = errs[0]
    # pydantic adds the tried member of a union to the location ("messages.0.content.str",
    # "...content.list[ContentPart]"): a type, not a place in the user's document, so it is left out
    where = ".".join(str(p) for p in first.get("loc", ()) if not _is_type_tag(p)) or top
    return f"{where}: {first.get('msg', 'invalid')}"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "list", "dict", "none", "is-instance"})


def _is_type_tag(part: object) -> bool:
    """Whether a pydantic location part names a union member's type (``str``, ``list[ContentPart]``,
    ``function-after[...]``) rather than a field or an index."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)
