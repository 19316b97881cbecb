"""What travels between the ServerApp and the ClientApps, and how it is converted.

Only adapter factors travel each round, in peft's naming (``base_model.model.<module>.lora_A.weight``,
``lora_B.weight``) and LLM coordinates, as float32 arrays in a Flower ``ArrayRecord``; masks never do
(the server knows every block's masks from extraction; the block id travels instead).

Server -> client, message type ``train``:
    ``init``: ArrayRecord, the factors the client starts from (``LegoStrategy.configure``'s task).
    ``config``: ConfigRecord ``{round, client, block-id, scaling}``.
Client -> server:
    ``factors``: ArrayRecord, the trained factors (LLM coordinates).
    ``metrics``: MetricRecord ``{num-examples, loss-first, loss-last, steps, tokens, seconds, ...}``.
    ``info``: ConfigRecord ``{client, block-id, scaling, losses, tasks (JSON)}``.
Server -> client, message type ``query`` (once per SuperNode, at start): empty ``config``; the reply's
``info`` says ``{partition-id, block-id, num-examples, tasks, legokit}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from legokit.adapters import factors_to_peft_state, peft_state_to_factors
from legokit.utils import LegokitError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def factors_to_record(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ArrayRecord:
    """Factors ``{module: (A (r, in), B (out, r))}`` -> an ArrayRecord in peft naming, float32, exact."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in factors_to_peft_state(factors).items()}
    return ArrayRecord(state)


def factors_from_record(record: ArrayRecord, sender: str) -> Factors:
    """The inverse of ``factors_to_record``; malformed content raises ``LegokitError`` naming ``sender``.

    Shapes are not checked here: ``strategy.check_result`` checks them against the LLM.
    """
    state = {}
    for key in record.keys():
        arr = record[key]
        if arr.dtype not in ("float32", "<f4"):
            raise LegokitError(f"{sender} sent {key} as {arr.dtype}; adapter factors travel as float32")
        state[key] = torch.from_numpy(np.array(arr.numpy(), dtype=np.float32, copy=True))
    if not state:
        raise LegokitError(f"{sender} sent no adapter factors")
    try:
        return peft_state_to_factors(state)
    except LegokitError as err:
        raise LegokitError(f"{sender}: {err}") from err


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays of a record (what Flower puts on the wire, before framing)."""
    return int(sum(len(record[k].data) for k in record.keys()))


def factors_nbytes(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Raw float32 bytes of a set of factors (no serialisation headers)."""
    return int(sum((a.numel() + b.numel()) * 4 for a, b in factors.values()))
