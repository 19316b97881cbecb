"""Secure aggregation of LEGO rounds with Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

No protocol of legokit's: Flower's workflow runs its four stages (setup, share keys, collect masked vectors,
unmask) over the Grid; legokit only chooses what the clients put in and what the server does with the sum.

**What is summed.** HeteAgg is ``ΔW_g = Σ n_k M_k ⊙ ΔW_k / Σ n_k M_k`` per coordinate: a ratio of two sums.
SecAgg+ returns the weighted mean ``Σ w_k x_k / Σ w_k`` of vectors ``x_k`` whose weight ``w_k`` is the client's
``FitRes.num_examples``. So each client sends, per module, ``x_k = [M_k ⊙ ΔW_k, M_k]`` as float64 with
``w_k = n_k`` (1 under ``fed.weighting=uniform`` and for ``heterofl``); the server gets
``[Σ w_k M_k ΔW_k / Σ w_k, Σ w_k M_k / Σ w_k]`` and their ratio is the aggregator's owner mean (``Σ w_k``
cancels). Coordinates no client owns (count 0) follow ``fed.uncovered`` as in one process. The server never
sees a client's update; what it does see: each client's metrics (loss, example count) and the sum.

**Quantization** (Flower's, inside ``secaggplus_mod``): the weight ratio ``round(w_k / W · Q) / Q`` scales
``x_k``, which is clipped to ``[-c, c]``, mapped to ``[0, Q]`` with stochastic rounding and masked modulo ``M``.
legokit chooses (``Quantization.for_round``):

- ``W`` (max weight): the smallest power of 2 >= the largest weight, so ``w_k / W · Q`` is an integer and the
  weights are exact;
- ``c`` = ``secagg-clip``, a power of 2 >= 1: the counts ``w_k / W`` (in ``(0, 1]``) and the zeros land exactly
  on the grid, so ``Σ w_k M_k`` comes back exact;
- ``Q``: the largest power of 2 <= 2^30 with ``K · Q < M = 2^32`` for the round's ``K`` clients (the sum never
  wraps around; 2^30 keeps Flower's int32 rounding in range).

Only the numerator is rounded: each owner of a coordinate adds an error below one step ``2c/Q``, divided by
the owners' ``Σ w_k / W``, so per coordinate ``|ΔW_g(SecAgg+) - ΔW_g| < 2 c W / (Q · min_k w_k)``
(``Quantization.bound``). A client whose ``w_k / W · |M_k ⊙ ΔW_k|`` exceeds ``c`` refuses to send (Flower would
clip it silently).

**Cost.** ``ΔW_k`` travels dense (sums of factors are not factors of the sum) and twice (values and counts), as
int64 after masking: 16 bytes per weight of every targeted module per client and round, against the
``r (in + out)`` float32 factors without SecAgg+. Each of the four stages is one message per client.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
from safetensors.torch import save_file

from legokit.aggregate import ClientUpdate
from legokit.federation import Exchange, Outcome
from legokit.flower.messages import factors_to_record, record_nbytes
from legokit.flower.supernodes import SuperNodeClients, check_reply_info, client_metrics
from legokit.messages import ClientResult, Task
from legokit.utils import LegokitError

MODULUS = 2 ** 32  # Flower's default modulus_range (masks are int64 below it)
MAX_QUANTIZATION = 2 ** 30  # Flower rounds to int32: values up to Q must fit


@dataclass(frozen=True)
class Quantization:
    """SecAgg+'s quantization of one round (``SecAggPlusWorkflow``'s arguments) and its error bound."""

    clip: float  # clipping_range c
    quantization_range: int  # Q
    modulus_range: int  # M
    max_weight: int  # W

    @classmethod
    def for_round(cls, clients: int, max_weight: int, clip: float) -> Quantization:
        """The exact-counts choice for ``clients`` clients whose weights are at most ``max_weight`` (module doc)."""
        if clients < 1 or max_weight < 1:
            raise LegokitError(f"SecAgg+ needs at least one client with weight >= 1 (got {clients}, {max_weight})")
        w = 1 << (int(max_weight) - 1).bit_length()  # smallest power of 2 >= max_weight
        q = min(MAX_QUANTIZATION, 1 << ((MODULUS - 1) // clients).bit_length() - 1)
        if q < 2 * clip * w:
            raise LegokitError(f"SecAgg+ cannot quantize exactly: Q={q} < 2 c W = {2 * clip * w:g} (clients={clients}, "
                               f"max weight {max_weight}, secagg-clip={clip}); use fed.weighting=uniform or fewer "
                               "clients per round")
        return cls(float(clip), q, MODULUS, w)

    def bound(self, min_weight: float) -> float:
        """Max |ΔW_g(SecAgg+) - ΔW_g| per coordinate when the smallest weight in the round is ``min_weight``."""
        return 2 * self.clip * self.max_weight / (self.quantization_range * min_weight)


def client_weight(weighted: bool, num_examples: int) -> int:
    """SecAgg+'s weight ``w_k`` of a client: its example count, or 1 (uniform weighting, ``heterofl``)."""
    return int(num_examples) if weighted else 1


def client_vectors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                   masks: Mapping[str, torch.Tensor], modules: Sequence[str], weight: int,
                   quant: Mapping[str, float], who: str) -> list[np.ndarray]:
    """What a client hands to ``secaggplus_mod``: per module ``M_k ⊙ ΔW_k`` and ``M_k``, float64 (out, in).

    ``M_k ⊙ ΔW_k`` is computed as the in-process aggregators compute it (``ClientUpdate.masked_delta``,
    float32), then widened exactly. Raises ``LegokitError`` when SecAgg+ would clip a value.
    """
    clip, max_weight = float(quant["clip"]), int(quant["max-weight"])
    if weight > max_weight:
        raise LegokitError(f"{who}: SecAgg+ weight {weight} exceeds the round's max weight {max_weight}")
    update = ClientUpdate(client=who, factors={n: factors[n] for n in modules}, scaling=scaling,
                          masks={n: masks[n] for n in modules}, weight=float(weight))
    out, peak = [], 0.0
    for name in modules:
        delta = update.masked_delta(name)  # (out, in) float32
        peak = max(peak, float(delta.abs().max()))
        out += [delta.double().numpy(), masks[name].to(torch.float64).numpy()]
    if peak * weight / max_weight > clip:
        need = 2 ** math.ceil(math.log2(peak * weight / max_weight))
        raise LegokitError(f"{who}: |w_k/W · M_k ⊙ ΔW_k| reaches {peak * weight / max_weight:.3g} > secagg-clip={clip}"
                           f": SecAgg+ would clip it; set secagg-clip={need}")
    return out


def fit_reply(vectors: list[np.ndarray], weight: int, metrics: Mapping[str, bool | int | float | str]) -> RecordDict:
    """A ClientApp's reply in the legacy ``FitRes`` layout that ``secaggplus_mod`` reads (it masks ``vectors``)."""
    fitres = FitRes(status=Status(Code.OK, "ok"), parameters=ndarrays_to_parameters(vectors), num_examples=weight,
                    metrics=dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def fit_task(content: RecordDict) -> tuple[ArrayRecord, dict]:
    """The ClientApp's view of a SecAgg+ ``train`` message: (starting factors as an ArrayRecord, its config)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    conf = dict(fitins.config)
    keys = json.loads(str(conf["keys"]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    return ArrayRecord({k: Array(a) for k, a in zip(keys, arrays, strict=True)}), conf


class _RoundTasks(Strategy):
    """The legacy ``Strategy`` that ``SecAggPlusWorkflow`` drives for one round: hands out the round's
    ``FitIns`` and keeps what ``aggregate_fit`` receives (every survivor's ``FitRes`` with the unmasked mean)."""

    def __init__(self, fitins: list[tuple[GridClientProxy, FitIns]]):
        self.fitins = fitins
        self.results: list[tuple[GridClientProxy, FitRes]] | None = None  # None: the workflow halted
        self.failures: list = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.fitins

    def aggregate_fit(self, server_round, results, failures):
        self.results, self.failures = list(results), list(failures)
        return None, {}  # nothing to store in the workflow's context: legokit keeps the global state

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecAggClients(SuperNodeClients):
    """``SuperNodeClients`` whose rounds go through Flower's SecAgg+: ``Federation`` gets the clients' metrics
    and the round's ``combine`` (ΔW_g from the securely summed numerator and counts), never an update."""

    def __call__(self, tasks: list[Task]) -> Exchange:
        self.discover(self.grid, 0.0)
        self._tasks, self._round_start = {t.client: t for t in tasks}, time.time()
        self._records = {t.client: {} for t in tasks}
        serving = [t for t in tasks if t.client in self.clients]
        threshold = self.options.secagg_threshold
        if len(serving) < threshold:
            return self._failed(f"SecAgg+ needs secagg-threshold={threshold} clients in a round but only "
                                f"{len(serving)} have a SuperNode")
        weighted = self.cfg.fed.weighting != "uniform" and self.lego.aggregator != "heterofl"
        weights = {t.client: client_weight(weighted, self.nodes[self.clients[t.client]].get("num_examples") or 1)
                   for t in serving}
        quant = Quantization.for_round(len(serving), max(weights.values()), self.options.secagg_clip)
        rnd = tasks[0].round
        strategy = _RoundTasks([self._fitins(t, quant, weighted) for t in serving])
        context = LegacyContext(Context(run_id=self.grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=threshold, max_weight=float(quant.max_weight),
                           clipping_range=quant.clip, quantization_range=quant.quantization_range,
                           modulus_range=quant.modulus_range, timeout=self.options.round_timeout)(self.grid, context)
        self._exchanged = time.time()
        if strategy.results is None:
            return self._failed(f"SecAgg+ stopped before unmasking: fewer than secagg-threshold={threshold} of the "
                                f"{len(serving)} clients answered a stage (see the ServerApp log)")
        return self._secure_exchange(strategy.results, quant, weights)

    def _fitins(self, t: Task, quant: Quantization, weighted: bool) -> tuple[GridClientProxy, FitIns]:
        record = factors_to_record(t.factors)
        self._records[t.client].update(node=self.clients[t.client], bytes_down=record_nbytes(record))
        config = {"round": t.round, "client": t.client, "block-id": self.block_ids[t.block],
                  "scaling": float(t.scaling), "keys": json.dumps(list(record.keys())),
                  "modules": json.dumps(self.lego.modules), "weighted": weighted,
                  "clip": quant.clip, "max-weight": quant.max_weight}
        proxy = GridClientProxy(self.clients[t.client], self.grid, self.grid.run.run_id)
        return proxy, FitIns(compat.arrayrecord_to_parameters(record, keep_input=True), config)

    def _failed(self, error: str) -> Exchange:
        self.log(f"round {next(iter(self._tasks.values())).round}: {error}")
        return Exchange([Outcome(t, error=error, record=self._records[t.client]) for t in self._tasks.values()],
                        {"bytes_down": 0, "bytes_up": 0})

    def _secure_exchange(self, results: list[tuple[GridClientProxy, FitRes]], quant: Quantization,
                         weights: dict[int, int]) -> Exchange:
        """Outcomes from the survivors' metrics; ``combine`` from the unmasked sums (checked against the masks)."""
        node_client = {node: k for k, node in self.clients.items()}
        ok: dict[int, ClientResult] = {}
        try:
            for proxy, fitres in results:
                k = node_client[proxy.node_id]
                m = fitres.metrics
                check_reply_info(k, m, self.block_ids, self.lego.block_of(k).id)
                ok[k] = ClientResult(k, {}, float(m["scaling"]), int(m["num-examples"]), client_metrics(m, m))
            sums = self._sums(parameters_to_ndarrays(results[0][1].parameters), {k: weights[k] for k in ok})
        except (LegokitError, KeyError) as err:  # the sum holds every survivor: one bad reply spoils the round
            return self._failed(f"SecAgg+ round rejected: {err}")
        entries = sum(a.size for a, _ in sums.values())
        outcomes = []
        for k, t in self._tasks.items():
            if k in ok:
                self._records[k]["bytes_up"] = 8 * (2 * entries + 1)  # int64 masked vector: values, counts, weight
                outcomes.append(Outcome(t, result=ok[k], record=self._records[k]))
            else:
                outcomes.append(Outcome(t, error="dropped out of SecAgg+ (no masked vector before unmasking)",
                                        record=self._records[k]))
        bound = quant.bound(min(weights[k] for k in ok))
        record = {"bytes_down": sum(r.get("bytes_down", 0) for r in self._records.values()),
                  "bytes_up": sum(r.get("bytes_up", 0) for r in self._records.values()),
                  "seconds_exchange": round(self._exchanged - self._round_start, 3),
                  "secagg": {**asdict(quant), "threshold": self.options.secagg_threshold, "bound": bound,
                             "clients": sorted(ok)}}
        self.log(f"round {next(iter(self._tasks.values())).round}: SecAgg+ summed {len(ok)} clients "
                 f"(Q={quant.quantization_range}, c={quant.clip:g}, W={quant.max_weight}; bound {bound:.3g})")
        return Exchange(outcomes, record, combine=_Combine(sums, self.cfg.fed.uncovered, self._save_path()))

    def _sums(self, arrays: list[np.ndarray], weights: dict[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{module: (Σ w M ΔW / Σ w, Σ w M / Σ w)}``; the counts must equal those of the survivors' known masks."""
        modules = self.lego.modules
        if len(arrays) != 2 * len(modules):
            raise LegokitError(f"the SecAgg+ sum has {len(arrays)} arrays, expected {2 * len(modules)}")
        total = float(sum(weights.values()))
        sums = {}
        for i, name in enumerate(modules):
            num, den = arrays[2 * i], arrays[2 * i + 1]
            expected = sum(w * self.lego.block_of(k).masks[name].to(torch.float64) for k, w in weights.items()) / total
            if den.shape != tuple(expected.shape) or float(np.abs(den - expected.numpy()).max()) > 1e-9:
                raise LegokitError(f"the securely summed counts of {name} do not match the survivors' blocks' masks "
                                   "(a client trained another block or sent wrong counts)")
            sums[name] = (num, den)
        return sums

    def _save_path(self):
        if not self.options.secagg_save_sums:
            return None
        return self.run_dir / "secagg" / f"round_{next(iter(self._tasks.values())).round:03d}.safetensors"


class _Combine:
    """``combine(name, previous)`` of a SecAgg+ round: ΔW_g = numerator / counts where a client owns the weight."""

    def __init__(self, sums: dict[str, tuple[np.ndarray, np.ndarray]], uncovered: str, save_to=None):
        self.sums, self.uncovered, self.save_to = sums, uncovered, save_to
        self.done: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, previous: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        num, den = self.sums[name]
        covered = den > 0
        if self.uncovered == "keep" and previous is not None and name in previous:
            fallback = previous[name].detach().double().cpu().numpy()
        else:
            fallback = np.zeros_like(num)
        delta = torch.from_numpy(np.where(covered, num / np.where(covered, den, 1.0), fallback)).float()
        if self.save_to is not None:
            self.done[name] = delta
            if len(self.done) == len(self.sums):
                self.save_to.parent.mkdir(parents=True, exist_ok=True)
                save_file(self.done, str(self.save_to))
        return delta
