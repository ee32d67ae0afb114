"""A trained model as one GGUF file that llama.cpp, and so Ollama, loads and tokenizes like mlx-lm.

Public entry point::

    export_gguf(base_model, adapter_dir, out_path, *, quantize=None, dtype="f16") -> GgufExport

``base_model`` is a local model folder or a Hugging Face repo id already in the cache (mlx-lm or
Hugging Face layout, ``model_type`` mistral or llama, float or mlx-lm quantised); ``adapter_dir``
is an mlx-lm LoRA adapter folder, or ``None`` to export the base alone. Each weight is read,
dequantised and merged with the adapter on its own (:mod:`.weights`) and written at once with
llama.cpp's own writer, the ``gguf`` package (:func:`write_gguf`): memory for one tensor, not for
the model, and no fused copy on disk. The file can then be quantised by llama.cpp
(:func:`quantize_gguf`, needs ``llama-cpp-python``); Ollama can also quantise at ``/api/create``,
a local quantisation only makes the upload smaller.

Why not ``mlx_lm fuse --export-gguf``: its file is refused by llama.cpp (token types stored as
UINT32 instead of INT32) and, once repaired, tokenizes most prompts differently (every score is
-1000, so SentencePiece merges happen in the wrong order) and lacks the chat template and BOS flag.
Here the tokenizer comes from the model's own ``tokenizer.model``: real scores, control pieces
(``<s>``, ``</s>``, ``[INST]``, ``[/INST]``…) typed CONTROL so ``[INST]`` in a prompt becomes the
control id, user-defined pieces kept atomic, byte pieces typed BYTE, all as INT32. A checkpoint
without ``tokenizer.model`` (mlx-lm's own conversions drop it) has the same vocabulary rebuilt from
its ``tokenizer.json`` (:func:`tokenizer_json_vocab`); the tests check both give llama.cpp the
same tokens as mlx-lm.

``tokenizer.ggml.add_space_prefix`` is written false. llama.cpp adds that space in front of every
piece of text that follows a special token, so with it ``[INST] Bonjour`` becomes ``[INST]``,
``▁``, ``▁Bon``…. Without it, the string Ollama is sent
(:meth:`mailrouter.chat_template.ChatTemplate.serving`) tokenizes to exactly the ids mlx-lm
trained on (``<s>[INST]▁Bonjour…[/INST]``): the tests check it for every starter test email.

Query and key projections are permuted from Hugging Face's rotary layout to llama.cpp's, as
llama.cpp's ``convert_hf_to_gguf.py`` does for the llama family.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import TokenType

from ..errors import TrainingError
from .weights import RowChunks, Weights

#: Quantisations :func:`quantize_gguf` knows, by Ollama's names (lower case).
QUANT_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
SUPPORTED_MODEL_TYPES = ("mistral", "llama")
#: What a cached base model needs here (as mlx-lm fetches it): config, weights, tokenizer.
CACHED_FILES = ["*.json", "model*.safetensors", "tokenizer.model", "*.jinja"]
_BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


@dataclass(frozen=True)
class GgufExport:
    """What :func:`export_gguf` wrote. ``file_type`` is f32, f16 or the quantisation applied."""

    path: Path
    file_type: str
    size_bytes: int
    seconds: float


def export_gguf(
    base_model: str | Path,
    adapter_dir: str | Path | None,
    out_path: str | Path,
    *,
    quantize: str | None = None,
    dtype: str = "f16",
) -> GgufExport:
    """Write ``base_model``, with ``adapter_dir`` merged in (if given), as GGUF at ``out_path``.

    ``dtype`` is the float type of the matrices (``f16``, or ``f32`` for exact comparisons);
    ``quantize`` (``q8_0``, ``q4_k_m``) re-encodes them with llama.cpp afterwards. The file appears
    at ``out_path`` only when complete (written beside it, then renamed).
    """
    started = time.monotonic()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    base_dir = model_dir(base_model)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
        work = Path(tmp)
        written = write_gguf(
            base_dir,
            work / "model.gguf",
            adapter=Path(adapter_dir) if adapter_dir is not None else None,
            dtype=dtype,
            name=base_dir.name + (" + LoRA" if adapter_dir is not None else ""),
        )
        file_type = dtype
        if quantize:
            file_type = quantize_gguf(written, work / "model.q.gguf", quantize)
            written = work / "model.q.gguf"
        written.replace(out)
    return GgufExport(out, file_type, out.stat().st_size, time.monotonic() - started)


def model_dir(model: str | Path) -> Path:
    """A local folder for ``model``: the path itself, or its copy in the Hugging Face cache."""
    path = Path(model)
    if path.is_dir():
        return path
    try:  # huggingface_hub's download machinery: ~450 ms, only for a model not on disk
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(str(model), local_files_only=True, allow_patterns=CACHED_FILES)
        )
    except Exception as exc:  # huggingface_hub raises several unrelated types here
        raise TrainingError(
            f"base model {model!r} is neither a folder nor in the Hugging Face cache "
            "(run `mailrouter train` once to download it)"
        ) from exc


def find_tokenizer(*folders: Path) -> Path:
    """``tokenizer.model`` from the first folder that has one, else a ``tokenizer.json`` to
    rebuild the same vocabulary from."""
    for name in ("tokenizer.model", "tokenizer.json"):
        for folder in folders:
            if (folder / name).is_file():
                return folder / name
    raise TrainingError(
        "no tokenizer.model or tokenizer.json in "
        + ", ".join(str(f) for f in folders)
        + ": the GGUF export needs the model's tokenizer"
    )


# --- writing ------------------------------------------------------------------------------------


def write_gguf(
    model_path: str | Path,
    out_path: str | Path,
    *,
    adapter: Path | None = None,
    dtype: str = "f16",
    tokenizer: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Write the model folder ``model_path``, with the LoRA ``adapter`` merged in, as a
    llama-architecture GGUF at ``out_path``, one tensor at a time (:class:`.weights.Weights`)."""
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype {dtype!r}: expected f16 or f32")
    folder = Path(model_path)
    config = _read_json(folder / "config.json")
    hp = _hyperparameters(config, folder)
    vocab = load_vocab(Path(tokenizer) if tokenizer else find_tokenizer(folder), hp["vocab_size"])
    weights = Weights(folder, config, adapter)

    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    _add_metadata(writer, hp, vocab, _chat_template(folder), name or folder.name, ftype)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["block_count"])
    plan = []
    for key, shape in sorted(weights.shapes.items(), key=lambda item: _order(item[0])):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise TrainingError(f"{folder}: tensor {key} has no llama.cpp name (unsupported model)")
        out_dtype = np.float32 if dtype == "f32" or len(shape) == 1 else np.float16
        plan.append((target, key, out_dtype))
        nbytes = int(np.prod(shape)) * np.dtype(out_dtype).itemsize
        writer.add_tensor_info(target, shape, np.dtype(out_dtype), nbytes)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _target, key, out_dtype in plan:  # one tensor in memory at a time, or less
            heads = _rotary_heads(key, hp)
            if heads is None:  # rows in order: computed and written some at a time
                chunks = RowChunks(weights, key, np.dtype(out_dtype))
                writer.write_tensor_data(chunks)  # type: ignore[arg-type]  # duck-typed array
                continue
            data = permute_qk(weights.tensor(key), heads)  # rows reordered: the whole tensor
            writer.write_tensor_data(np.ascontiguousarray(data, dtype=out_dtype))
    finally:
        writer.close()
    return Path(out_path)


def _rotary_heads(key: str, hp: dict[str, Any]) -> int | None:
    """The head count whose rotary halves :func:`permute_qk` interleaves, for q and k only."""
    if key.endswith("q_proj.weight"):
        return int(hp["head_count"])
    if key.endswith("k_proj.weight"):
        return int(hp["head_count_kv"])
    return None


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face stores rotary pairs as two halves of each head; llama.cpp interleaves them."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int


def load_vocab(path: Path, vocab_size: int) -> Vocab:
    """The vocabulary from ``tokenizer.model`` or, failing that, a SentencePiece-derived
    ``tokenizer.json``."""
    vocab = tokenizer_json_vocab(path) if path.suffix == ".json" else sentencepiece_vocab(path)
    size = len(vocab.tokens)
    if size > vocab_size:
        raise TrainingError(
            f"{path} has {size} pieces but the model's vocab_size is {vocab_size}: "
            "tokenizer and model do not belong together"
        )
    pad = range(size, vocab_size)  # embedding rows beyond the tokenizer: never produced
    return Vocab(
        vocab.tokens + [f"[PAD{i}]" for i in pad],
        vocab.scores + [-1000.0] * len(pad),
        vocab.types + [int(TokenType.UNUSED)] * len(pad),
        vocab.bos_id,
        vocab.eos_id,
        vocab.unk_id,
    )


def sentencepiece_vocab(path: Path) -> Vocab:
    """Pieces, scores and types straight from the SentencePiece model's protobuf.

    SentencePiece's piece types (normal, unknown, control, user-defined, unused, byte) use the
    same numbers as llama.cpp's token types, so they are copied as they are; the processor API
    could not tell user-defined pieces (``[REFERENCE_DOC_0]``…), which must stay atomic.
    """
    from sentencepiece import sentencepiece_model_pb2  # protobuf: only for SentencePiece

    # protobuf generates ModelProto when the module loads; sentencepiece ships no stub for it
    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, OSError
        raise TrainingError(f"{path}: not a SentencePiece model: {exc}") from exc
    spec = proto.trainer_spec
    return Vocab(
        [p.piece for p in proto.pieces],
        [float(p.score) for p in proto.pieces],
        [int(p.type) for p in proto.pieces],
        spec.bos_id,
        spec.eos_id,
        spec.unk_id,
    )


def tokenizer_json_vocab(path: Path) -> Vocab:
    """The same vocabulary rebuilt from Hugging Face's conversion of a SentencePiece BPE model.

    Some converted checkpoints ship no ``tokenizer.model``. Their ``tokenizer.json`` lists the
    merges in SentencePiece's score order, so minus the merge rank orders merges as the original
    scores do; pieces no merge produces get lower scores (single characters start a SentencePiece
    tokenization, they are never merged into). A piece of several characters that no merge
    produces is a user-defined piece. Special added tokens are control tokens.
    """
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise TrainingError(
            f"{path}: not a converted SentencePiece BPE tokenizer (Mistral, Llama 2); "
            "the GGUF export needs the model's tokenizer.model"
        )
    pieces = {i: p for p, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    for i, token in added.items():
        pieces.setdefault(i, token["content"])
    merges = model.get("merges", [])
    score: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        score.setdefault(left + right, -float(rank))
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(max(pieces) + 1):
        piece = pieces.get(i, f"[PAD{i}]")
        if piece == unk:
            kind = TokenType.UNKNOWN
        elif i in added and added[i].get("special"):
            kind = TokenType.CONTROL
        elif _BYTE_PIECE.match(piece):
            kind = TokenType.BYTE
        elif i not in pieces:
            kind = TokenType.UNUSED
        elif piece not in score and len(piece) > 1:
            kind = TokenType.USER_DEFINED
        else:
            kind = TokenType.NORMAL
        tokens.append(piece)
        types.append(int(kind))
        normal = kind == TokenType.NORMAL
        scores.append(score.get(piece, -float(len(merges) + i)) if normal else 0.0)
    ids = {p: i for i, p in enumerate(tokens)}
    return Vocab(tokens, scores, types, ids.get("<s>", 1), ids.get("</s>", 2), ids.get(unk, 0))


def _hyperparameters(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TrainingError(
            f"{folder}: model_type {model_type!r} cannot be exported to GGUF here "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "vocab_size": config["vocab_size"],
        "context_length": config.get("max_position_embeddings", 32768),
        "embedding_length": hidden,
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": heads,
        "head_count_kv": config.get("num_key_value_heads", heads),
        "head_dim": head_dim,
        "rms_eps": config.get("rms_norm_eps", 1e-5),
        "rope_theta": config.get("rope_theta", 10000.0),
    }


def _add_metadata(
    writer: Any, hp: dict[str, Any], vocab: Vocab, template: str | None, name: str, ftype: int
) -> None:
    writer.add_name(name)
    writer.add_file_type(ftype)
    writer.add_quantization_version(2)
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_rope_freq_base(hp["rope_theta"])

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if template:
        writer.add_chat_template(template)


def _chat_template(folder: Path) -> str | None:
    """The template mlx-lm trained with: ``chat_template.jinja`` or the tokenizer config's."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    template = _read_json(config_path).get("chat_template") if config_path.is_file() else None
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{path}: cannot read: {exc}") from exc


# --- tensor order -------------------------------------------------------------------------------


def _order(key: str) -> tuple[int, int, str]:
    """Embeddings, then the blocks in order, then the final norm and the output head."""
    if "embed_tokens" in key:
        return (0, 0, key)
    parts = key.split(".")
    if "layers" in parts:
        return (1, int(parts[parts.index("layers") + 1]), key)
    return (2, 0, key)


# --- quantisation -------------------------------------------------------------------------------


def quantize_gguf(src: str | Path, dst: str | Path, kind: str) -> str:
    """Re-encode ``src`` as ``kind`` with llama.cpp; returns the type actually written.

    Q4_K needs rows whose length is a multiple of 256; llama.cpp then falls back per tensor. If it
    still fails (tiny models), Q8_0 is written instead and returned, so callers can record it.
    """
    try:  # llama.cpp (a dev extra): heavy, and only to quantize
        import llama_cpp
    except ImportError as exc:
        raise TrainingError(
            "quantising a GGUF needs llama-cpp-python (`pip install llama-cpp-python`), "
            "or leave quantize unset and let Ollama quantise at /api/create"
        ) from exc
    key = kind.lower()
    if key not in QUANT_TYPES:
        raise TrainingError(f"unknown quantisation {kind!r}: expected one of {sorted(QUANT_TYPES)}")
    for attempt in dict.fromkeys([key, "q8_0"]):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANT_TYPES[attempt])
        code = llama_cpp.llama_model_quantize(
            str(src).encode(), str(dst).encode(), llama_cpp.byref(params)
        )
        if code == 0:
            return attempt
    raise TrainingError(f"llama.cpp could not quantise {src} to {kind} (nor to q8_0)")
