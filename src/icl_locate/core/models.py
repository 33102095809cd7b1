"""Loading models: hub ids, local checkpoints, .gguf files, aliases and tiny random models.

``load_model(spec)`` returns a ``LoadedModel`` (model in eval mode, prepared for masking; its
tokenizer; a ``ModelInfo`` description). Adding a model family usually needs nothing here:
anything that dispatches attention through transformers' AttentionInterface just works; inline
attention needs an entry in ``legacy.ADAPTERS``; a new alias is one line in ``ALIASES``.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as bpe_models
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ..util.errors import UserError
from ..util.system import fit_threads_to_cpu_quota, use_device
from .attention import prepare_model
from .catalog import ALIASES, DTYPE_NAMES, EMBEDDED, TINY_CONFIGS, check_dtype_name
from .checkpoints import MANIFEST, embedded_checkpoint, gguf_checkpoint
from .structure import config_layers, decoder_config
from .tokenizer_files import load_tokenizer


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    source: str  # hub id, directory or file actually loaded
    architecture: str
    model_type: str
    num_layers: int
    num_heads: int
    context_length: int | None
    dtype: str
    device: str
    revision: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: nn.Module | None  # None: a description only (load_description), the weights live elsewhere
    tokenizer: object
    info: ModelInfo


# --------------------------------------------------------------------------- public entry


def load_model(
    spec: str, dtype: str | torch.dtype | None = None, device: str | None = None, attn_implementation: str | None = None
) -> LoadedModel:
    """Load a model by hub id, local directory, .gguf file, alias or ``tiny:<family>``.

    Defaults: float32 on CPU, bfloat16 on GPU. The model comes back in eval mode and prepared
    for mask plans (``masking.prepare_model``). ``attn_implementation``: "sdpa" or "eager";
    None takes transformers' default for the architecture. On a CPU, torch's threads are fitted to the
    process's CPU quota first (``system.fit_threads_to_cpu_quota``).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if device == "cpu":
        fit_threads_to_cpu_quota()  # torch's default counts the cores, not a container's or job's CPU quota
    use_device(device)
    if spec.startswith("tiny:"):
        model, tokenizer, source = _tiny(spec.split(":", 1)[1], attn_implementation), byte_tokenizer(), spec
    else:
        source = _resolve_source(spec)
        model, tokenizer = _from_pretrained(source, spec, torch_dtype, attn_implementation)
    model = model.to(device=device, dtype=torch_dtype).eval()
    prepare_model(model)
    return LoadedModel(model, tokenizer, describe(model, spec, source, getattr(model.config, "_commit_hash", None)))


def describe(model: nn.Module, spec: str, source: str, revision: str | None = None) -> ModelInfo:
    param = next(model.parameters())
    return _describe_config(model.config, type(model).__name__, spec, source, param.dtype, str(param.device), revision)


def _describe_config(
    config, architecture: str, spec: str, source: str, dtype: torch.dtype, device: str, revision: str | None = None
) -> ModelInfo:
    text = decoder_config(config)
    heads = next(
        (
            getattr(text, a)
            for a in ("num_attention_heads", "num_heads", "n_head")
            if isinstance(getattr(text, a, None), int)
        ),
        0,
    )
    context = next(
        (
            getattr(text, a)
            for a in ("max_position_embeddings", "n_positions", "seq_length")
            if isinstance(getattr(text, a, None), int)
        ),
        None,
    )
    return ModelInfo(
        spec=spec,
        source=source,
        architecture=architecture,
        model_type=text.model_type,
        num_layers=config_layers(config),
        num_heads=heads,
        context_length=context,
        dtype=str(dtype).replace("torch.", ""),
        device=device,
        revision=revision,
    )


def load_description(spec: str, dtype: str | torch.dtype | None = None, device: str | None = None) -> LoadedModel:
    """The tokenizer and the model's description, without its weights (``model`` is None).

    What a driver needs to plan units and check prompt lengths while workers elsewhere hold the
    weights: the config and tokenizer of a hub model or checkpoint are a few kB to MB.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if spec.startswith("tiny:"):
        loaded = load_model(spec, dtype=torch_dtype, device="cpu")
        return LoadedModel(None, loaded.tokenizer, dataclasses.replace(loaded.info, device=device))
    source = _resolve_source(spec)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = _tokenizer(source)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the config and tokenizer of {source!r} ({_first_line(err)})") from None
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return LoadedModel(
        None,
        tokenizer,
        _describe_config(
            config, architecture, spec, source, torch_dtype, device, getattr(config, "_commit_hash", None)
        ),
    )


# --------------------------------------------------------------------------- resolution


def resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype_name(dtype)
    return getattr(torch, DTYPE_NAMES[dtype])


def _resolve_source(spec: str) -> str:
    """Turn a spec into a directory to load from (building caches as needed) or a hub id."""
    if spec == EMBEDDED:
        return str(embedded_checkpoint())
    if spec in ALIASES:
        return ALIASES[spec]
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return str(gguf_checkpoint(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{spec} is not a model directory (no config.json)")
        return str(path)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise UserError(
            f"model {spec!r} is neither a local path, a .gguf file, an alias "
            f"({', '.join([EMBEDDED, *ALIASES])}) nor a hub id (owner/name)"
        )
    return spec


def _from_pretrained(
    source: str, spec: str, torch_dtype: torch.dtype, attn_implementation: str | None
) -> tuple[nn.Module, object]:
    try:
        # the tokenizer loads while the model class is imported and the weights are mapped
        with ThreadPoolExecutor(1) as pool:
            tokenizer_job = pool.submit(_tokenizer, source)
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, attn_implementation=attn_implementation
            )
            tokenizer = tokenizer_job.result()
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise UserError(f"cannot load model from {source}: {err}") from None
        raise UserError(
            f"cannot load {source!r} from the Hugging Face hub ({_first_line(err)}). Without network access, "
            f"download it elsewhere (`hf download {source} --local-dir DIR`) and pass --model DIR"
        ) from None
    return model, tokenizer


def _tokenizer(source: str):
    """The source's tokenizer, prepared for batching; a checkpoint we built loads from its tokenizer.json."""
    if (Path(source) / MANIFEST).is_file():
        return load_tokenizer(Path(source), _prepared_tokenizer)
    return _prepared_tokenizer(AutoTokenizer.from_pretrained(source))


def _prepared_tokenizer(tokenizer):
    """Left padding, and a pad token (EOS where the model has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


# --------------------------------------------------------------------------- tiny models


def _tiny(family: str, attn_implementation: str | None = None) -> nn.Module:
    if family not in TINY_CONFIGS:
        raise UserError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_CONFIGS)}")
    kwargs = dict(TINY_CONFIGS[family])
    model_type = kwargs.pop("model_type")
    tok = byte_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kwargs,
    )
    torch.manual_seed(0)  # the same tiny model every time
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) plus BOS/EOS/PAD.

    Offline stand-in for tiny models: GPT-2-style pre-tokenisation and real offset mappings.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(bpe_models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", padding_side="left"
    )
