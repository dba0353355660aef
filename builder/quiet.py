"""Quiet third-party libraries during a build: progress bars and advisory warnings off, our stages report."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _DropOrtAdvice(logging.Filter):
    """Drops onnxruntime's "pre-processing before quantization" advice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quiet_third_party(*, heavy: bool = True) -> None:
    """Silence libraries' progress bars and advisory warnings (transformers weight loading, the torch ONNX
    exporter's optional-op notes, onnxruntime's quantization pre-processing advice); our stages report progress.

    ``heavy=False`` sets the environment and loggers and touches torch/transformers only if already imported
    (importing them costs seconds a fully cached build does not need); the stages that load them call this
    with ``heavy=True`` when they run.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if heavy or "torch" in sys.modules:
        try:  # torch configures its own loggers on import, so import it first, then lower them
            import torch._logging

            torch._logging.set_logs(onnx=logging.ERROR)
        except (ImportError, AttributeError, ValueError):
            pass
    for name in ("torch.onnx", "torch._dynamo", "onnxscript", "onnx_ir", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    # PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if heavy or "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
        except ImportError:  # transformers is a builder dependency; absent only in broken installs
            pass
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _DropOrtAdvice) for f in h.filters):
            h.addFilter(_DropOrtAdvice())
