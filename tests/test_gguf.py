"""The GGUF export, checked by llama.cpp itself: it loads, tokenizes and answers like mlx-lm."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sentencepiece as spm
from gguf import GGUFReader, GGUFValueType, TokenType

from mailrouter.chat_template import MISTRAL_V3, ChatTemplate
from mailrouter.errors import TrainingError
from mailrouter.training.gguf import export_gguf, load_vocab, quantize_gguf, write_gguf
from tests.conftest import require
from tests.fixtures.models import starter_test_prompts

#: The string the Ollama backend sends with ``raw: true`` for the tiny model (Mistral v0.3).
SERVING = ChatTemplate.mistral_v3().serving

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dev dependency")

ANSWER_TOKENS = 3


def _field(reader: GGUFReader, key: str) -> tuple[list[GGUFValueType], object]:
    field = reader.fields[key]
    return list(field.types), field.contents()


def _llama(path: Path, *, vocab_only: bool = False) -> Any:
    return llama_cpp.Llama(
        str(path), n_ctx=1024, n_threads=1, verbose=False, vocab_only=vocab_only, seed=0
    )


def _llama_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from llama.cpp (argmax of its logits), reusing the cached common prefix.

    Plain argmax over ``eval`` is what greedy decoding is, and 3x faster here than ``generate``,
    whose sampler chain dominates on a tiny model.
    """
    common = 0
    for cached, wanted in zip(llm.input_ids[: llm.n_tokens], ids, strict=False):
        if cached != wanted:
            break
        common += 1
    llm.n_tokens = min(common, len(ids) - 1)
    llm.eval(ids[llm.n_tokens :])
    out: list[int] = []
    while len(out) < n:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        token = int(np.argmax(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),))))
        if token == llm.token_eos():
            break
        out.append(token)
        llm.eval([token])
    return out


def _tensor(reader: GGUFReader, name: str) -> np.ndarray:
    return next(t.data for t in reader.tensors if t.name == name)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    found = starter_test_prompts()
    require(bool(found), "the starter data has no test split")
    return found


@pytest.fixture(scope="module")
def reader(tiny_gguf: Path) -> GGUFReader:
    """Parsing 32,768 token strings takes seconds: once per module."""
    return GGUFReader(tiny_gguf)


def test_tokenizer_metadata(reader: GGUFReader, tiny_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model / "tokenizer.model"))
    assert _field(reader, "general.architecture")[1] == "llama"
    assert _field(reader, "tokenizer.ggml.model")[1] == "llama"

    types, values = _field(reader, "tokenizer.ggml.token_type")
    assert types == [GGUFValueType.ARRAY, GGUFValueType.INT32]  # llama.cpp refuses UINT32
    assert len(values) == 32768
    tokens = _field(reader, "tokenizer.ggml.tokens")[1]
    for piece in ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[control_100]"]:
        assert values[tokens.index(piece)] == TokenType.CONTROL, piece
    assert values[0] == TokenType.UNKNOWN
    assert values[tokens.index("[REFERENCE_DOC_3]")] == TokenType.USER_DEFINED  # kept atomic
    assert values[tokens.index("<0x0A>")] == TokenType.BYTE
    assert values[tokens.index("▁Bon")] == TokenType.NORMAL

    types, scores = _field(reader, "tokenizer.ggml.scores")
    assert types == [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]
    expected = [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert np.allclose(scores, expected) and len(set(scores)) > 1000

    assert _field(reader, "tokenizer.ggml.bos_token_id")[1] == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id")[1] == 2
    assert _field(reader, "tokenizer.ggml.add_bos_token") == ([GGUFValueType.BOOL], True)
    assert _field(reader, "tokenizer.ggml.add_eos_token") == ([GGUFValueType.BOOL], False)
    assert _field(reader, "tokenizer.ggml.add_space_prefix")[1] is False
    assert _field(reader, "tokenizer.chat_template")[1] == MISTRAL_V3


def test_tensors(reader: GGUFReader) -> None:
    shapes = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name) for t in reader.tensors}
    assert shapes["token_embd.weight"] == ((64, 32768), "F32")  # ggml order: columns first
    assert shapes["output.weight"] == ((64, 32768), "F32")
    assert shapes["blk.1.attn_q.weight"] == ((64, 64), "F32")
    assert shapes["blk.1.attn_k.weight"] == ((64, 32), "F32")
    assert shapes["blk.0.ffn_gate.weight"] == ((64, 128), "F32")
    assert shapes["output_norm.weight"] == ((64,), "F32")
    assert len(shapes) == 3 + 2 * 9


#: Text the starter emails do not exercise: accents, symbols, other scripts, emoji (byte
#: fallback), tabs and runs of spaces, a user-defined piece.
ODD_TEXT = "Ça coûte 12 € — vraiment ? 日本語 😀 \t tabs   spaces [REFERENCE_DOC_3] fin"


def _assert_tokenizes_like_mlx(gguf_path: Path, tiny_model: Path, prompts: list[str]) -> None:
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    llm = _llama(gguf_path, vocab_only=True)
    for prompt in [*prompts, ODD_TEXT]:
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        expected = list(expected["input_ids"] if isinstance(expected, dict) else expected)
        got = llm.tokenize(SERVING(prompt).encode(), add_bos=True, special=True)
        assert got == expected, prompt


def test_llama_cpp_tokenizes_like_mlx(
    tiny_gguf: Path, tiny_model: Path, prompts: list[str]
) -> None:
    """The string Ollama gets (``ChatTemplate.serving``) is exactly the ids mlx-lm trained on."""
    _assert_tokenizes_like_mlx(tiny_gguf, tiny_model, prompts)


def test_vocabulary_from_tokenizer_json(
    tiny_model: Path, tmp_path: Path, prompts: list[str]
) -> None:
    """A checkpoint without ``tokenizer.model``: the vocabulary is rebuilt from tokenizer.json."""
    from_model = load_vocab(tiny_model / "tokenizer.model", 32768)
    from_json = load_vocab(tiny_model / "tokenizer.json", 32768)
    assert from_json.tokens == from_model.tokens and from_json.types == from_model.types
    assert (from_json.bos_id, from_json.eos_id, from_json.unk_id) == (1, 2, 0)

    folder = tmp_path / "no-spm"
    shutil.copytree(tiny_model, folder)
    (folder / "tokenizer.model").unlink()
    _assert_tokenizes_like_mlx(write_gguf(folder, tmp_path / "json.gguf"), tiny_model, prompts)


def test_llama_cpp_answers_like_mlx(tiny_gguf: Path, tiny_model: Path, prompts: list[str]) -> None:
    from mailrouter.classify.mlx import MlxClassifier
    from mailrouter.config import default_departments

    mlx = MlxClassifier(tiny_model, default_departments(), max_tokens=ANSWER_TOKENS)
    llm = _llama(tiny_gguf)
    for prompt in prompts:
        ids = mlx.prompt_ids(prompt)
        tokens, _text, _probs = mlx.answer(ids)
        assert _llama_greedy(llm, ids, ANSWER_TOKENS)[: len(tokens)] == tokens


def test_adapter_is_fused(
    tiny_model: Path, tiny_adapter: Path, reader: GGUFReader, tmp_path: Path, prompts: list[str]
) -> None:
    """Base + adapter merged tensor by tensor → GGUF answers as MLX with the adapter, then Q8_0
    loads."""
    from mailrouter.classify.mlx import MlxClassifier
    from mailrouter.config import default_departments

    result = export_gguf(tiny_model, tiny_adapter, tmp_path / "out" / "fused.gguf", dtype="f32")
    assert result.path.is_file() and result.file_type == "f32"
    assert [p.name for p in result.path.parent.iterdir()] == ["fused.gguf"]  # no leftovers

    fused = _tensor(GGUFReader(result.path), "blk.0.attn_q.weight")
    assert not np.allclose(fused, _tensor(reader, "blk.0.attn_q.weight"))

    mlx = MlxClassifier(
        tiny_model, default_departments(), adapter_path=tiny_adapter, max_tokens=ANSWER_TOKENS
    )
    llm = _llama(result.path)
    for prompt in prompts[:5]:
        ids = mlx.prompt_ids(prompt)
        tokens, _text, _probs = mlx.answer(ids)
        assert _llama_greedy(llm, ids, ANSWER_TOKENS)[: len(tokens)] == tokens

    q8 = tmp_path / "q8.gguf"
    assert quantize_gguf(result.path, q8, "q8_0") == "q8_0"
    assert q8.stat().st_size < result.size_bytes / 3
    assert _llama(q8).tokenize(b"[INST] Bonjour[/INST]", add_bos=True, special=True)[:2] == [1, 3]
    # Q4_K_M needs rows of 256: llama.cpp falls back per tensor, or we fall back to Q8_0.
    assert quantize_gguf(result.path, tmp_path / "q4.gguf", "q4_K_M") in {"q4_k_m", "q8_0"}
    _llama(tmp_path / "q4.gguf")


def test_bfloat16_weights_are_exported(tiny_model: Path, tmp_path: Path) -> None:
    """Real checkpoints are bfloat16, which numpy lacks: the reader widens it to float32."""
    from safetensors.numpy import load_file

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    # bfloat16 = the top 16 bits of a float32: truncate, and remember what it must decode to.
    halves = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in weights.items()}
    raw = b"".join(h.tobytes() for h in halves.values())
    header: dict[str, object] = {}
    offset = 0
    for key, h in halves.items():
        header[key] = {
            "dtype": "BF16",
            "shape": list(h.shape),
            "data_offsets": [offset, offset + h.nbytes],
        }
        offset += h.nbytes
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + raw)
    written = GGUFReader(write_gguf(folder, tmp_path / "bf16.gguf", dtype="f32"))
    assert np.array_equal(_tensor(written, "output_norm.weight"), np.ones(64, np.float32))
    embd = _tensor(written, "token_embd.weight")
    expected = (halves["model.embed_tokens.weight"].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(embd, expected)


def test_refuses_what_it_cannot_export(tiny_model: Path, tmp_path: Path) -> None:
    quantised = tmp_path / "q"
    shutil.copytree(tiny_model, quantised)
    config = json.loads((quantised / "config.json").read_text())
    (quantised / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(TrainingError, match="gemma"):
        write_gguf(quantised, tmp_path / "x.gguf")

    (quantised / "config.json").write_text(json.dumps(config))
    (quantised / "tokenizer.model").unlink()
    (quantised / "tokenizer.json").unlink()
    with pytest.raises(TrainingError, match=r"no tokenizer\.model or tokenizer\.json"):
        write_gguf(quantised, tmp_path / "x.gguf")

    with pytest.raises(TrainingError, match="Hugging Face cache"):
        export_gguf("nobody/not-a-model", None, tmp_path / "x.gguf")


def test_f16_export_answers_like_mlx(tiny_model: Path, tmp_path: Path, prompts: list[str]) -> None:
    """The production width: f16 rounding moves logits by ~1e-3, so only clear choices count."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mailrouter.classify.mlx import MlxClassifier
    from mailrouter.config import default_departments

    mlx = MlxClassifier(tiny_model, default_departments())
    llm = _llama(write_gguf(tiny_model, tmp_path / "f16.gguf", dtype="f16"))
    clear = 0
    for prompt in prompts[:10]:
        ids = mlx.prompt_ids(prompt)
        logits = mlx._last_logits(mx.array(ids)[None], make_prompt_cache(mlx.model))
        top2 = np.sort(np.array(logits.astype(mx.float32)))[-2:]
        if top2[1] - top2[0] < 0.05:
            continue
        clear += 1
        assert _llama_greedy(llm, ids, 1) == [int(mx.argmax(logits).item())]
    assert clear >= 5


def test_quantised_base_is_dequantised(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path, prompts: list[str]
) -> None:
    """The default base is a 4-bit MLX conversion: the export dequantises it tensor by tensor,
    and since mlx-lm's conversion drops ``tokenizer.model``, the vocabulary comes from
    tokenizer.json. A 3-bit layer (packed across words) is refused by name."""
    import subprocess
    import sys

    from mailrouter.classify.mlx import MlxClassifier
    from mailrouter.config import default_departments

    base = tmp_path / "q4"
    cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(tiny_model),
           "--mlx-path", str(base), "-q", "--q-bits", "4", "--q-group-size", "64"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert json.loads((base / "config.json").read_text())["quantization"]["bits"] == 4
    assert not (base / "tokenizer.model").exists()

    result = export_gguf(base, tiny_adapter, tmp_path / "q4.gguf", dtype="f32")
    mlx = MlxClassifier(base, default_departments(), adapter_path=tiny_adapter, max_tokens=2)
    llm = _llama(result.path)
    for prompt in prompts[:3]:
        ids = mlx.prompt_ids(prompt)
        assert llm.tokenize(SERVING(prompt).encode(), add_bos=True, special=True) == ids
        tokens, _text, _probs = mlx.answer(ids)
        assert _llama_greedy(llm, ids, 2)[: len(tokens)] == tokens

    config = json.loads((base / "config.json").read_text())
    config["quantization"]["model.layers.0.mlp.up_proj"] = {"bits": 3, "group_size": 64}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match=r"model\.layers\.0\.mlp\.up_proj .* 3 bits"):
        write_gguf(base, tmp_path / "x.gguf")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantize_is_mlx_dequantize(bits: int) -> None:
    """The numpy reading of MLX's packed affine layers gives what ``mx.dequantize`` gives."""
    import mlx.core as mx

    from mailrouter.training.weights import Quantized, dequantize

    w = mx.random.normal((8, 256), key=mx.random.key(bits))
    packed, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    expected = np.array(mx.dequantize(packed, scales, biases, group_size=64, bits=bits))
    found = dequantize(np.array(packed), np.array(scales), np.array(biases), Quantized(bits, 64))
    assert found.shape == (8, 256)
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6)


def test_rows_written_in_chunks_are_the_whole_tensor(
    tiny_model: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    """The writer gets big tensors a few rows at a time: the bytes are those of the whole."""
    from mailrouter.training.weights import RowChunks, Weights

    config = json.loads((tiny_model / "config.json").read_text())
    weights = Weights(tiny_model, config, tiny_adapter)
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        chunks = RowChunks(weights, key, np.dtype(np.float16), chunk_bytes=4096)
        assert chunks.step < weights.shapes[key][0]
        with (tmp_path / "rows").open("wb") as out:  # a real file, as the writer's
            chunks.tofile(out)
        whole = weights.tensor(key).astype(np.float16)
        rows = np.fromfile(tmp_path / "rows", dtype=np.float16).reshape(whole.shape)
        assert chunks.nbytes == whole.nbytes
        # the merge's product, blocked differently by BLAS, may move the last bit of a value
        np.testing.assert_allclose(rows, whole, rtol=2e-3, atol=1e-6)
    assert "model.layers.1.mlp.down_proj.weight" in weights.lora  # the merge is chunked too
