"""A model folder's weights with a LoRA adapter merged in, produced one float tensor at a time.

The GGUF export (:mod:`.gguf`) asks for each tensor in turn and writes it before asking for the
next, so publishing a 7B model needs memory for its largest tensor, not for the model: the base is
never loaded whole, and no fused copy of it is written to disk (``mlx_lm fuse`` held the whole
float16 model, ~14.5 GB for Mistral-7B, in memory and wrote it out before the GGUF).

For each weight:

- **read** straight from the ``.safetensors`` files (float32, float16, bfloat16; no framework):
  ``np.fromfile`` at the tensor's offset, so only that tensor is in memory;
- **dequantized** when the base is an mlx-lm quantised checkpoint (``mlx-community/…-4bit``):
  such a layer is stored as ``weight`` (uint32, ``32 / bits`` values a word, lowest bits first),
  ``scales`` and ``biases`` (one of each per ``group_size`` values along a row), and each value is
  ``scale * q + bias`` — MLX's affine quantisation (``mlx/ops.cpp``, ``quantize``/``dequantize``;
  the tests check this reading equals ``mx.dequantize``);
- **merged** with the adapter: ``W + scale * lora_b.T @ lora_a.T``, what mlx-lm's own fuse
  computes (``mlx_lm/tuner/lora.py``, ``LoRALinear.fuse``), with ``scale`` from the adapter's
  ``adapter_config.json`` (``lora_parameters.scale``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TrainingError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}
_QUANT_PARTS = (".scales", ".biases")


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a ``.safetensors`` file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int

    @property
    def count(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class Quantized:
    """How an mlx-lm checkpoint quantised one layer (``config.json``'s ``quantization``)."""

    bits: int
    group_size: int


def safetensors_index(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of ``files`` by name, without reading any tensor."""
    index: dict[str, Stored] = {}
    for path in files:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise TrainingError(
                    f"{path}: tensor {key} is {info['dtype']}; only float weights and mlx-lm "
                    "quantised layers can be exported"
                )
            start = 8 + size + info["data_offsets"][0]
            index[key] = Stored(path, info["dtype"], tuple(info["shape"]), start)
    return index


def read(stored: Stored, rows: slice = slice(None)) -> np.ndarray:
    """One tensor (or its ``rows``), read into its own buffer (float32 for bfloat16, which numpy
    lacks)."""
    start, stop, _ = rows.indices(stored.shape[0])
    per_row = stored.count // stored.shape[0]
    dtype = np.dtype(_DTYPES[stored.dtype])
    data = np.fromfile(
        stored.path,
        dtype=dtype,
        count=(stop - start) * per_row,
        offset=stored.start + start * per_row * dtype.itemsize,
    ).reshape(stop - start, *stored.shape[1:])
    if stored.dtype == "BF16":
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data


def dequantize(
    packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, quant: Quantized
) -> np.ndarray:
    """MLX's affine dequantisation, in float32: ``scale * q + bias`` per group of a row."""
    per_word = 32 // quant.bits
    shifts = np.arange(per_word, dtype=np.uint32) * quant.bits
    mask = np.uint32((1 << quant.bits) - 1)
    values = (packed[..., None] >> shifts) & mask  # (..., words, per_word): low bits first
    groups = values.reshape(*packed.shape[:-1], -1, quant.group_size).astype(np.float32)
    del values  # in place from here: about two float32 copies of the tensor at the peak
    groups *= scales.astype(np.float32)[..., None]
    groups += biases.astype(np.float32)[..., None]
    return groups.reshape(*packed.shape[:-1], -1)


class Weights:
    """The float tensors of ``folder`` (quantised layers read dequantised), with an mlx-lm LoRA
    adapter merged in when ``adapter_dir`` is given. :meth:`tensor` computes one at a time, or
    some of its rows."""

    def __init__(
        self, folder: Path, config: dict[str, Any], adapter_dir: Path | None = None
    ) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise TrainingError(f"{folder}: no .safetensors weights")
        self.folder = folder
        self.stored = safetensors_index(files)
        self.quantization = config.get("quantization") or {}
        self.scale, self.lora = load_adapter(adapter_dir) if adapter_dir else (0.0, {})
        self.shapes = {
            key: self._shape(key, stored)
            for key, stored in self.stored.items()
            if not key.endswith(_QUANT_PARTS) or not self._is_quantized(key.rsplit(".", 1)[0])
        }
        unknown = sorted(k for k in self.lora if k not in self.shapes)
        if unknown:
            raise TrainingError(
                f"{adapter_dir}: the adapter changes {unknown[0]}, which {folder} does not have "
                "(an adapter trained on another base model?)"
            )

    def _is_quantized(self, module: str) -> bool:
        return f"{module}.scales" in self.stored

    def _quantized(self, module: str) -> Quantized:
        """The layer's settings: its own entry in ``quantization`` if any, else the model's."""
        found = self.quantization.get(module)
        settings = found if isinstance(found, dict) else self.quantization
        quant = Quantized(int(settings.get("bits", 0)), int(settings.get("group_size", 0)))
        mode = settings.get("mode", "affine")
        if mode != "affine" or quant.bits not in (2, 4, 8) or quant.group_size <= 0:
            raise TrainingError(
                f"{self.folder}: {module} is quantised as {mode} with {quant.bits} bits; the "
                "export reads MLX's affine 2-, 4- and 8-bit layers (use a 4-bit or 8-bit "
                "mlx-community conversion, or the float model)"
            )
        return quant

    def _shape(self, key: str, stored: Stored) -> tuple[int, ...]:
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and self._is_quantized(module):
            bits = self._quantized(module).bits
            return (*stored.shape[:-1], stored.shape[-1] * 32 // bits)
        if stored.dtype == "U32":
            raise TrainingError(f"{self.folder}: {key} is packed but has no scales")
        return stored.shape

    def tensor(self, key: str, rows: slice = slice(None)) -> np.ndarray:
        """Rows ``rows`` of tensor ``key`` as float: dequantised if stored quantised, plus their
        LoRA delta (rows of ``scale * lora_b.T @ lora_a.T``)."""
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and self._is_quantized(module):
            data = dequantize(
                read(self.stored[key], rows),
                read(self.stored[f"{module}.scales"], rows),
                read(self.stored[f"{module}.biases"], rows),
                self._quantized(module),
            )
        else:
            data = read(self.stored[key], rows)
        pair = self.lora.get(key)
        if pair is None:
            return data
        lora_a, lora_b = (read(p).astype(np.float32) for p in pair)
        merged = data.astype(np.float32, copy=False)  # a buffer of our own: added in place
        merged += self.scale * (lora_b.T[rows] @ lora_a.T)
        return merged


class RowChunks:
    """A tensor the GGUF writer takes as if it were an array (``nbytes`` and ``tofile``, all
    that ``GGUFWriter.write_tensor_data`` of the ``gguf`` package uses of it when the byte order
    is native) but computes and writes ``chunk_bytes`` of float32 rows at a time: for the
    embeddings of a 7B model, tens of megabytes instead of gigabytes."""

    def __init__(
        self, weights: Weights, key: str, dtype: np.dtype[Any], chunk_bytes: int = 16 << 20
    ) -> None:
        self.weights, self.key, self.dtype = weights, key, dtype
        self.shape = weights.shapes[key]
        per_row = int(np.prod(self.shape[1:]))
        self.nbytes = int(np.prod(self.shape)) * dtype.itemsize
        self.step = max(1, chunk_bytes // (4 * per_row))

    def tofile(self, out: Any) -> None:
        for start in range(0, self.shape[0], self.step):
            rows = slice(start, min(start + self.step, self.shape[0]))
            np.ascontiguousarray(self.weights.tensor(self.key, rows), dtype=self.dtype).tofile(out)


def load_adapter(adapter_dir: Path) -> tuple[float, dict[str, tuple[Stored, Stored]]]:
    """An mlx-lm LoRA adapter: its ``scale`` and, by base weight name, its ``lora_a``/``lora_b``."""
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapters.safetensors"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{config_path}: cannot read the adapter's settings: {exc}") from exc
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise TrainingError(f"{adapter_dir}: a {kind!r} adapter; only LoRA adapters are merged")
    if not weights_path.is_file():
        raise TrainingError(f"{adapter_dir}: no adapters.safetensors")
    stored = safetensors_index([weights_path])
    pairs: dict[str, tuple[Stored, Stored]] = {}
    for key in stored:
        module, leaf = key.rsplit(".", 1)
        if leaf == "lora_a":
            if "embed_tokens" in module:
                raise TrainingError(f"{adapter_dir}: LoRA on the embeddings is not merged here")
            pairs[f"{module}.weight"] = (stored[key], stored[f"{module}.lora_b"])
    return float(config["lora_parameters"]["scale"]), pairs
