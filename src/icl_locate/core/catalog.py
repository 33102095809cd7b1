"""What ``--model`` and ``--dtype`` accept, as plain data: read by ``icl-locate models`` and by input
validation without importing torch or transformers (``core/models.py`` loads what these name)."""

from __future__ import annotations

from ..util.errors import UserError

EMBEDDED = "gemma-3-270m"

# alias -> Hugging Face hub id (the paper's models)
ALIASES: dict[str, str] = {
    "gpt-neo-2.7b": "EleutherAI/gpt-neo-2.7B",
    "bloom-3b": "bigscience/bloom-3b",
    "starcoder2-7b": "bigcode/starcoder2-7b",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
}

# tiny random models for tests and smoke runs: "tiny:<family>"
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "starcoder2": dict(
        model_type="starcoder2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=16,
        max_position_embeddings=2048,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=4, n_head=4, n_positions=2048),
    "gpt_neox": dict(
        model_type="gpt_neox",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=2048,
    ),
    "gpt_neo": dict(
        model_type="gpt_neo",
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=16,
        max_position_embeddings=2048,
    ),
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=4, n_head=4),
}

# --dtype names -> torch dtype names (``models.resolve_dtype`` maps them to torch dtypes)
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def check_dtype_name(dtype: str | None) -> None:
    """A --dtype value must be one of ``DTYPE_NAMES`` (None: the device's default)."""
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPE_NAMES):
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
