"""The Flower side of LEGO: the one round loop (``legokit.federation.Federation``) with SuperNodes as clients.

``FlowerStrategy`` is the Flower ``Strategy`` the ServerApp starts; it only converts and delegates (as Flower's
own strategies do with ``aggregate()``): the round loop, every decision and all algebra are ``legokit``'s.
``start`` discovers the SuperNodes, then runs ``Federation``'s rounds; ``Federation.step`` hands each round's
tasks to its client runner, ``supernodes.SuperNodeClients`` (``train`` messages out, replies back as outcomes),
and ``Federation.finish`` validates, aggregates and checkpoints the round exactly as in one process. That is
the only way a round is finished: Flower's generic loop (``configure_train`` / ``aggregate_train``) is not used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from legokit.checkpoint import Checkpoint
from legokit.federation import Federation, RoundRecord
from legokit.flower.messages import factors_to_record
from legokit.flower.runconfig import FlowerOptions
from legokit.flower.secagg import SecAggClients
from legokit.flower.supernodes import SuperNodeClients
from legokit.strategy import LegoStrategy
from legokit.utils import LegokitError

_GENERIC_LOOP = ("FlowerStrategy runs its rounds with start(): Federation.step sends each round's tasks through "
                 "SuperNodeClients and finishes the round; Flower's generic loop (configure_train / "
                 "aggregate_train) is not used")


class FlowerStrategy(Strategy):
    """LEGO rounds over Flower's Grid: ``Federation``'s loop, with ``SuperNodeClients`` as its client runner.

    Args:
        lego: the legokit strategy (blocks' masks, global state, configure and aggregate).
        checkpoint: the run directory; the rounds continue after its last finished round.
        options: Flower-only settings (timeouts, poll interval).
        log: where progress lines go (the ServerApp's log).
    """

    def __init__(self, lego: LegoStrategy, checkpoint: Checkpoint, options: FlowerOptions,
                 log: Callable[[str], None] = print):
        self.lego, self.log = lego, log
        self.cfg = lego.cfg
        runner = SecAggClients if options.secagg else SuperNodeClients  # SecAgg+: the server sees only the sum
        self.supernodes = runner(lego, options, checkpoint.path, log=log)
        self.federation = Federation(lego, self.supernodes, checkpoint, log=log)

    @property
    def clients(self) -> dict[int, int]:
        """``{client: node id}`` of the SuperNodes serving clients (``SuperNodeClients.clients``)."""
        return self.supernodes.clients

    # ----- the round loop -----------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Callable | None = None) -> Result:
        """Discover the SuperNodes, then run the remaining rounds of ``Federation``'s loop over the Grid.

        Replaces Flower's generic loop to add what LEGO needs: SuperNode discovery, a round deadline that
        aggregates over the survivors, a faster reply poll, and checkpoint / resume through the run directory.
        ``initial_arrays`` and ``num_rounds`` are accepted for interface compatibility (the legokit strategy
        holds the initial state, ``fed.rounds`` the number of rounds); ``timeout``, when given, is the round
        deadline instead of ``round-timeout``.
        """
        nodes = self.supernodes
        if timeout is not None:
            nodes.options = FlowerOptions(**{**vars(nodes.options), "round_timeout": float(timeout)})
        nodes.grid = grid
        self.summary()
        nodes.discover(grid, nodes.options.nodes_timeout)
        if not nodes.clients:
            raise LegokitError(f"no usable SuperNode joined within nodes-timeout={nodes.options.nodes_timeout} s "
                               f"(see {nodes.run_dir / 'nodes.json'}): start one per client with "
                               "`flower-supernode ... --node-config 'partition-id=K'`")
        result = Result()
        while not self.federation.done:
            arrays, metrics = self._to_flower(self.federation.step())
            if arrays is not None:
                result.arrays = arrays
            result.train_metrics_clientapp[self.federation.round] = metrics
        return result

    def _to_flower(self, done: RoundRecord) -> tuple[ArrayRecord | None, MetricRecord]:
        """A finished round as Flower reports it: the global adapter (when there is one) and round metrics."""
        line = done.metrics
        self.log(f"round {done.round}: {len(done.results)}/{len(done.lines)} clients aggregated, "
                 f"{line['bytes_down']} B down, {line['bytes_up']} B up, {line['seconds']} s")
        metrics = {"clients": len(done.results), "failed": len(done.lines) - len(done.results),
                   "bytes-down": line["bytes_down"], "bytes-up": line["bytes_up"]}
        if "energy_kept_mean" in line:
            metrics["energy-kept-mean"] = line["energy_kept_mean"]
        if done.results:
            metrics["loss-last-mean"] = sum(r.metrics["loss_last"] for r in done.results) / len(done.results)
        adapter = self.lego.broadcast.adapter_for(None)
        return (None if adapter is None else factors_to_record(adapter[0])), MetricRecord(metrics)

    # ----- Flower's Strategy interface ----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Not used: ``start`` runs the rounds (``SuperNodeClients`` builds the ``train`` messages)."""
        raise LegokitError(_GENERIC_LOOP)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: ``start`` runs the rounds (``Federation.finish`` aggregates them)."""
        raise LegokitError(_GENERIC_LOOP)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the experiment evaluates the global model afterwards."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    def summary(self) -> None:
        """Log the strategy's setup."""
        fed = self.cfg.fed
        self.log(f"FlowerStrategy: {fed.num_clients} clients, {fed.rounds} rounds, aggregator {fed.aggregator}, "
                 f"broadcast {fed.broadcast}, blocks {self.supernodes.block_ids}, "
                 f"round-timeout {self.supernodes.options.round_timeout} s"
                 + (f", SecAgg+ (threshold {self.supernodes.options.secagg_threshold})"
                    if self.supernodes.options.secagg else ""))
