"""A tiny Mistral-architecture model with the real Mistral v0.3 tokenizer, built in a second.

Tests, ``mailrouter demo --with-mlx`` (which LoRA-trains it) and anyone trying the training loop
without a download need a model that mlx-lm loads, trains and fuses exactly like
``mistralai/Mistral-7B-Instruct-v0.3``, only small: the same architecture (``model_type:
mistral``, grouped-query attention, untied output), the same SentencePiece tokenizer (shipped by
Mistral in the ``mistral-common`` package, 32,768 pieces with the ``[INST]``/``[/INST]`` control
pieces), and our chat template. Prompt token counts, control tokens in the GGUF export and
train/serve token equality are then the real ones; only the weights are random (a fixed seed, so
every build is byte-identical).

Usage: ``python -m mailrouter.training.tinymodel OUT_DIR``, then ``training.base_model =
"OUT_DIR"``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

from ..chat_template import MISTRAL_V3
from ..errors import TrainingError

SEED = 0

CONFIG = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 32768,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}

#: Mistral's own copy of the Mistral-7B-Instruct-v0.3 SentencePiece model, inside mistral-common.
TOKENIZER_RESOURCE = "data/mistral_instruct_tokenizer_240323.model.v3"


def mistral_tokenizer_path() -> Path:
    """The v0.3 SentencePiece file shipped by ``mistral-common`` (a dev extra: only this model
    needs it, so an installed mailrouter may lack it and the error says how to add it)."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        raise TrainingError(
            "the tiny model's tokenizer comes from the mistral-common package: "
            "`pip install mistral-common` (with pipx: `pipx inject mailrouter mistral-common`)"
        )
    path = Path(spec.origin).parent / TOKENIZER_RESOURCE
    if not path.is_file():
        raise TrainingError(f"{path} is missing: reinstall mistral-common")
    return path


def weights(config: dict = CONFIG, seed: int = SEED) -> dict[str, np.ndarray]:
    """Random weights named as in Hugging Face's Mistral checkpoints.

    Scales keep activations near unit size so the logits are spread out: greedy answers are then
    far from ties, and two runtimes (MLX, llama.cpp) pick the same token.
    """
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, vocab = config["head_dim"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim

    def linear(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = linear(q_dim, hidden)
        out[p + "self_attn.k_proj.weight"] = linear(kv_dim, hidden)
        out[p + "self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = linear(hidden, q_dim)
        out[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        out[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        out[p + "mlp.down_proj.weight"] = linear(hidden, inter)
        out[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        out[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    out["model.norm.weight"] = np.ones(hidden, np.float32)
    out["lm_head.weight"] = linear(vocab, hidden)
    return out


def tokenizer_config(sp_model_path: Path) -> dict:
    """``tokenizer_config.json`` as Mistral publishes it for v0.3, with our chat template.

    Every control piece of the SentencePiece model (``<s>``, ``</s>``, ``[INST]``, ``[/INST]``,
    ``[TOOL_CALLS]``, ``[control_N]``…) is declared special, so text containing ``[INST]`` is
    tokenized to the control id, as mistral-common does.
    """
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    added = {}
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            added[str(i)] = {
                "content": sp.id_to_piece(i),
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": MISTRAL_V3,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
    }


def build(out_dir: Path | str) -> Path:
    """Write the model folder (config, weights, tokenizer) into ``out_dir`` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sp_path = mistral_tokenizer_path()
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    save_file(weights(), str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(sp_path, out / "tokenizer.model")
    config = tokenizer_config(sp_path)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    _write_fast_tokenizer(out)
    return out


def _write_fast_tokenizer(out: Path) -> None:
    """Add ``tokenizer.json`` so loading the model never converts the SentencePiece file again.

    The conversion takes a few seconds; doing it once here makes every later ``mlx_lm.load`` fast.
    Only the fast tokenizer is saved: ``save_pretrained`` would also rewrite the config files with
    loader-specific keys.
    """
    from transformers import AutoTokenizer  # heavy (seconds): only when a model is built

    tok = AutoTokenizer.from_pretrained(str(out))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def main(argv: list[str]) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found"
    if len(argv) != 1:
        print("usage: python -m mailrouter.training.tinymodel OUT_DIR", file=sys.stderr)
        return 2
    path = build(argv[0])
    print(f"tiny Mistral model written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
