"""Prompts and tokens: the one place an ``Example`` becomes text (``render``) and token ids, for training
(``encode``, ``tokenize_example``) and scoring (``prompt_ids``, ``choice_ids``, ``harness_requests``) alike."""

from __future__ import annotations

from legokit.data.tasks import Example
from legokit.names import TRAIN_FORMATS
from legokit.utils import LegokitError


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _response_body(text: str, tokenizer) -> str:
    # The plain fallback puts the answer after "Answer:", so it needs the separating space.
    return text if _has_chat_template(tokenizer) else " " + text


def render(example: Example, tokenizer) -> tuple[str, str]:
    """The one place prompts are formatted, for training and evaluation alike.

    Returns:
        ``(prompt_text, response_text)``: the prompt through the tokenizer's chat template with the
        generation prompt (or ``"Question: ...\\nAnswer:"`` without a template), and the response
        followed by the end-of-turn token (``tokenizer.eos_token``).
    """
    if _has_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}],
                                               add_generation_prompt=True, tokenize=False)
    else:
        prompt = f"Question: {example.prompt}\nAnswer:"
    return prompt, _response_body(example.response, tokenizer) + (tokenizer.eos_token or "\n")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` where the tokenizer starts every text with its BOS token, else ``[]``.

    It does when its ``add_bos_token`` flag says so or when its own special-token template adds BOS to a text
    (Gemma's does, and Gemma reads text without it badly; SmolLM2's and tiny-llama's add none).
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    wants = getattr(tokenizer, "add_bos_token", False) or tokenizer("")["input_ids"][:1] == [bos]
    return [bos] if wants else []


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    pre = bos_prefix(tokenizer)
    return pre + ids if pre and ids[:1] != pre else ids


def prompt_ids(tokenizer, prompt_text: str) -> list[int]:
    """Token ids of a rendered prompt: BOS only where the tokenizer wants one and the text lacks it."""
    return _with_bos(tokenizer, _ids(tokenizer, prompt_text))


def harness_requests(example: Example, tokenizer) -> tuple[list[int], list[list[int]]]:
    """The option-scoring request of a choice example as lm-evaluation-harness builds it (``HFLM._encode_pair``):
    ``(context ids, [continuation ids per option])``.

    Each continuation is ``" " + option`` (the target delimiter) after the plain ``example.context``; trailing
    whitespace of the context moves onto the continuation; the continuation's ids are those of
    ``context + continuation`` after the context's own ids; no special tokens but the BOS a tokenizer that
    wants one puts before the context (``bos_prefix``; the harness sets ``add_bos_token`` for Gemma alike).
    """
    if not example.context or not example.options:
        raise LegokitError(f"example {example.uid or example.prompt[:40]!r} of {example.task!r} has no cloze form "
                           "(context and options); harness scoring needs a choice task from legokit.data.TASKS")
    context = example.context.rstrip()
    space = example.context[len(context):]
    ctx = _ids(tokenizer, context)
    conts = []
    for option in example.options:
        whole = _ids(tokenizer, context + space + " " + option)
        conts.append(whole[len(ctx):])
    return _with_bos(tokenizer, ctx), conts


def tokenize_example(example: Example, tokenizer, fmt: str = "chat") -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``, tokenized separately so the boundary is exact.

    ``fmt`` (``names.TRAIN_FORMATS``): ``"chat"`` renders the chat prompt and the response with its end-of-turn
    token (``render``); ``"cloze"`` gives a choice example's harness request for its gold option
    (``harness_requests``: the plain context, then the option's text, no end-of-turn token), so training teaches
    exactly the continuation harness scoring reads. A generative example has one form, its chat prompt, under
    both.
    """
    if fmt not in TRAIN_FORMATS:
        raise LegokitError(f"unknown training format {fmt!r}: use one of {list(TRAIN_FORMATS)}")
    if fmt == "cloze" and example.choices:
        context, options = harness_requests(example, tokenizer)
        return context, options[example.answer_index]
    prompt, response = render(example, tokenizer)
    return prompt_ids(tokenizer, prompt), _ids(tokenizer, response)


def choice_ids(example: Example, tokenizer) -> list[list[int]]:
    """Token ids of each choice as a response continuation (without the end-of-turn token)."""
    if not example.choices:
        raise LegokitError(f"example {example.uid or example.prompt[:40]!r} of {example.task!r} has no choices")
    return [_ids(tokenizer, _response_body(c, tokenizer)) for c in example.choices]


def encode(example: Example, tokenizer, max_len: int, fmt: str = "chat") -> tuple[list[int], list[int]]:
    """Training tokens: ``(input_ids, labels)`` with -100 on the prompt, in training format ``fmt``
    (``tokenize_example``).

    Prompt and response are tokenized separately and concatenated. Beyond ``max_len`` the prompt
    loses tokens from the left; the response keeps at most ``max_len - min(len(prompt), max_len // 4)``
    tokens so some context always survives.
    """
    if max_len < 2:
        raise LegokitError(f"max_len={max_len} is too small; use at least 2 (typically 256-1024)")
    p, r = tokenize_example(example, tokenizer, fmt)
    if len(p) + len(r) > max_len:
        r = r[: max_len - min(len(p), max_len // 4)]
        p = p[len(p) - (max_len - len(r)):] if max_len > len(r) else []
    return p + r, [-100] * len(p) + r
