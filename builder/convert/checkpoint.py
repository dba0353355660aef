"""A Hugging Face checkpoint folder opened lazily: config.json plus safetensors read one tensor at a time.

Both layouts are handled: a single ``model.safetensors`` and a sharded one (``model.safetensors.index.json``
whose ``weight_map`` names the shard of each tensor). Tensor data is only read when :meth:`Checkpoint.tensor`
is called, so converting a model needs memory for one tensor, not the whole model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.shared.errors import InputNotFoundError, ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorMeta:
    """Shape (HF order, e.g. ``(out_features, in_features)``) and safetensors dtype (``"F32"``, ``"BF16"``...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: Path


class Checkpoint:
    """A checkpoint folder: its parsed ``config.json`` and a lazy index of its safetensors tensors.

    Raises (from the constructor):
        InputNotFoundError: ``model_dir`` does not exist or is not a directory.
        ModelLoadError: config.json is missing or invalid, no safetensors file is present (``.bin`` only
            checkpoints are refused with a hint), a shard named by the index is missing or unreadable.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise InputNotFoundError(
                f"model folder {self.model_dir} does not exist or is not a directory",
                hint="pass a local Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)",
            )
        cfg_path = self.model_dir / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(
                f"{self.model_dir} has no config.json", hint="pass the folder that holds the checkpoint's config.json"
            )
        try:
            self.config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"Cannot read {cfg_path}: {exc}", hint="re-download the checkpoint") from exc
        if not isinstance(self.config, dict):
            raise ModelLoadError(f"{cfg_path} is not a JSON object", hint="re-download the checkpoint")
        self.tensors: dict[str, TensorMeta] = self._index()

    @property
    def architecture(self) -> str:
        """The first entry of config ``architectures`` (e.g. ``"LlamaForCausalLM"``), or ``""`` if absent."""
        archs = self.config.get("architectures") or []
        return str(archs[0]) if archs else ""

    def _index(self) -> dict[str, TensorMeta]:
        from safetensors import safe_open

        index_path = self.model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                raise ModelLoadError(
                    f"Cannot read the shard index {index_path}: {exc}", hint="re-download the checkpoint"
                ) from exc
            shards = sorted({self.model_dir / s for s in weight_map.values()})
        else:
            shards = sorted(self.model_dir.glob("*.safetensors"))
        if not shards:
            has_bin = any(self.model_dir.glob("*.bin"))
            raise ModelLoadError(
                f"No .safetensors weights in {self.model_dir}"
                + (" (only PyTorch .bin files, which are pickles and are not loaded)" if has_bin else ""),
                hint="re-save the model with save_pretrained(..., safe_serialization=True)",
            )
        metas: dict[str, TensorMeta] = {}
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(
                    f"Shard {shard.name} named by model.safetensors.index.json is missing from {self.model_dir}",
                    hint="download every shard of the checkpoint",
                )
            try:
                with safe_open(str(shard), framework="pt") as fh:
                    for name in fh.keys():
                        sl = fh.get_slice(name)
                        metas[name] = TensorMeta(name, tuple(int(d) for d in sl.get_shape()), sl.get_dtype(), shard)
            except Exception as exc:  # safetensors raises its own SafetensorError / OSError
                raise ModelLoadError(
                    f"Cannot read safetensors file {shard}: {exc}",
                    hint="the file is corrupt or truncated; re-download it",
                ) from exc
        return metas

    def tensor(self, name: str) -> np.ndarray:
        """Load one tensor as a C-contiguous float32 numpy array (any float dtype, BF16 included, is upcast).

        Raises:
            ModelLoadError: the tensor is not in the checkpoint or cannot be read.
        """
        from safetensors import safe_open

        meta = self.tensors.get(name)
        if meta is None:
            raise ModelLoadError(
                f"Tensor {name} is missing from the checkpoint in {self.model_dir}",
                hint="the checkpoint is incomplete or not of the architecture its config.json names",
            )
        try:
            with safe_open(str(meta.shard), framework="pt") as fh:
                t = fh.get_tensor(name)
            return np.ascontiguousarray(t.float().numpy())
        except Exception as exc:
            raise ModelLoadError(
                f"Cannot read tensor {name} from {meta.shard}: {exc}", hint="the shard is corrupt; re-download it"
            ) from exc
