"""The one scorer of likelihoods: summed log-probabilities of continuations after their prefixes, packed.

Every likelihood score of ``legokit.evaluate`` (choice options, gold-response NLL, held-out windows' token
log-probabilities) goes through ``score_requests`` or ``target_logprobs``: requests packed without padding into
rows, a tree mask so a prompt shared by several options is computed once, and the vocabulary projection only where
a token is scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from legokit.utils import LegokitError

# A scoring request: one prefix and the continuations scored after it, ``(prefix_ids, [continuation_ids])``.
Request = tuple[list[int], list[list[int]]]


def _layout(req: Request) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """One request as a token tree: ``(ids, branch, depth, targets)``.

    The prefix is laid out once, then each continuation's tokens but its last (nothing is predicted after the
    last one). ``branch`` is 0 on the prefix and ``j + 1`` on continuation ``j``; ``depth`` is the position id
    (a continuation token sits right after the prefix, whatever continuations come before it in the layout).
    ``targets`` lists ``(continuation j, token t, layout index of the hidden state that predicts it)``.
    """
    prefix, conts = req
    ids, branch, depth = list(prefix), [0] * len(prefix), list(range(len(prefix)))
    targets = []
    for j, cont in enumerate(conts):
        at = len(prefix) - 1  # the first token is predicted by the prefix's last state
        for t, tok in enumerate(cont):
            targets.append((j, t, at))
            if t < len(cont) - 1:
                at = len(ids)
                ids.append(tok)
                branch.append(j + 1)
                depth.append(len(prefix) + t)
    return ids, branch, depth, targets


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of request lengths into rows of ``capacity`` tokens (index lists)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(capacity, lengths[i]) - lengths[i])
    return rows


def score_requests(model, requests: Sequence[Request], *, row_tokens: int = 384, batch_tokens: int = 3072,
                   bar=None) -> list[list[float]]:
    """Summed log-probability of every continuation after its prefix: ``[[log p(cont_j | prefix)]]``.

    The fast path of every likelihood score. Requests are packed without padding into rows of about
    ``row_tokens`` tokens (first-fit decreasing; a longer request gets a row of its own), rows into forwards of
    about ``batch_tokens`` tokens. Inside a row a block-diagonal tree mask lets each continuation attend to its
    own prefix and its own earlier tokens, so a prefix shared by several options is computed once and one
    option never sees another. The vocabulary projection runs only on the hidden states that predict a
    continuation token. Exact up to float rounding: every token sees exactly the context it would see alone.
    """
    if any(not p for p, _ in requests):
        raise LegokitError("a scoring request has an empty prefix; start it with a BOS/EOS token")
    layouts = [_layout(r) for r in requests]
    rows = _pack([len(lay[0]) for lay in layouts], row_tokens)
    rows.sort(key=lambda r: -sum(len(layouts[i][0]) for i in r))  # similar widths share a forward
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    out: list[list[float]] = [[0.0] * len(r[1]) for r in requests]
    b = 0
    while b < len(rows):
        width = sum(len(layouts[i][0]) for i in rows[b])
        n_rows = max(1, min(len(rows) - b, batch_tokens // max(width, 1)))
        batch = rows[b: b + n_rows]
        b += n_rows
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        pos = torch.zeros((len(batch), width), dtype=torch.long)
        seg = torch.full((len(batch), width), -1, dtype=torch.long)  # which request a token belongs to
        br = torch.zeros((len(batch), width), dtype=torch.long)
        where: list[tuple[int, int, int, int, int]] = []  # (request, cont j, token t, row, column)
        for r, members in enumerate(batch):
            col = 0
            for i in members:
                tok_ids, branch, depth, targets = layouts[i]
                n = len(tok_ids)
                ids[r, col: col + n] = torch.tensor(tok_ids)
                pos[r, col: col + n] = torch.tensor(depth)
                seg[r, col: col + n] = i
                br[r, col: col + n] = torch.tensor(branch)
                where += [(i, j, t, r, col + at) for j, t, at in targets]
                col += n
        # (B, T, T): same request, causal in layout order, and the key is on the prefix or on the query's branch
        idx = torch.arange(width)
        mask = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
        mask &= (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
        mask |= torch.eye(width, dtype=torch.bool)[None]  # padding attends to itself: no empty softmax row
        masks = attention_masks(model.config, mask[:, None], pos)
        hidden = decoder(input_ids=ids.to(device), attention_mask=_to(masks, device),
                         position_ids=pos.to(device)).last_hidden_state  # (B, T, D)
        rows_t = torch.tensor([w[3] for w in where], device=device)
        cols_t = torch.tensor([w[4] for w in where], device=device)
        tgt = torch.tensor([requests[i][1][j][t] for i, j, t, _, _ in where], device=device)
        picked = target_logprobs(head, hidden[rows_t, cols_t], tgt).tolist()  # K = scored tokens
        for (i, j, _, _, _), v in zip(where, picked, strict=True):
            out[i][j] += v
        if bar is not None:
            bar.update(len({i for r in batch for i in r}))
    return out


def attention_masks(config, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed rows' mask ``(B, 1, T, T)`` as the decoder wants it, given the token positions ``pos`` (B, T).

    A custom 4D mask replaces the model's own, sliding window included, so the window is applied here: a key
    further than ``config.sliding_window`` positions back is hidden. Models that mix sliding and global layers
    (Gemma 3, ``config.layer_types``) take one mask per layer type; a model whose every layer slides (Mistral,
    no ``layer_types``) one windowed mask.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return mask
    near = (pos[:, None, :, None] - pos[:, None, None, :]) < window  # (B, 1, T, T): query minus key position
    if types is None:
        return mask & near
    return {"full_attention": mask, "sliding_attention": mask & near}


def _to(masks: torch.Tensor | dict[str, torch.Tensor], device) -> torch.Tensor | dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in masks.items()} if isinstance(masks, dict) else masks.to(device)


# Logits held at once: about 12.6M floats (~50 MB), i.e. 256 rows at SmolLM2's 49k vocabulary, 48 at Gemma 3's 262k.
LOGIT_ELEMENTS = 256 * 49152


def target_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``log p(target_k | hidden_k)`` for ``hidden`` (K, D) and ``targets`` (K,), projecting ``chunk`` rows at a
    time so no (K, vocabulary) tensor is ever held (K is thousands of tokens in a batch of long windows).
    ``chunk`` defaults to ``LOGIT_ELEMENTS`` over the vocabulary size."""
    if chunk is None:
        chunk = max(1, LOGIT_ELEMENTS // head.weight.shape[0])
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for a in range(0, targets.shape[0], chunk):
        logp = torch.log_softmax(head(hidden[a: a + chunk]).float(), dim=-1)  # (chunk, V)
        out[a: a + chunk] = logp.gather(-1, targets[a: a + chunk, None])[:, 0]
    return out
