"""A Flower strategy whose configure / aggregate / broadcast are ``legokit.federation.Server``'s.

The strategy only converts and delegates (as Flower's own strategies do with ``aggregate()``):

- ``configure_train``: ``Server.sample`` picks the round's clients, ``Server.start_state`` gives each its
  starting factors; each becomes a ``train`` message to the SuperNode that serves that client.
- ``aggregate_train``: each reply becomes a ``ClientResult``; ``Server.validate`` rejects wrong modules or
  shapes (recorded as a failure, not aggregated); ``Server.aggregate`` runs HeteAgg (or the configured
  aggregator) and the SVD re-factoring for the broadcast; ``Server.save`` and ``RunDir.finish_round``
  checkpoint the round exactly as the in-process loop does.

Which SuperNode is which client: at start (and at every round for SuperNodes that joined since) the
strategy sends a ``query`` message; the ClientApp answers with its ``partition-id`` (from its node config)
and, optionally, the block id its device holds. A SuperNode with a bad partition id, a duplicate, or a block
id the server does not know is rejected and recorded in ``nodes.json``.

Failures: a reply that carries an error, a reply that is malformed, and no reply before ``round-timeout``
are recorded in ``metrics.jsonl`` (status ``failed``); the round aggregates over the survivors. A SuperNode
that missed a deadline or that the SuperLink reports unavailable is dropped; it rejoins by restarting
(a restarted SuperNode has a new node id and is queried again).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from legokit.federation import ClientResult, RunDir, Server
from legokit.flower.messages import factors_from_record, factors_to_record, record_nbytes
from legokit.flower.runconfig import FlowerOptions
from legokit.utils import LegokitError, atomic_write_json

_GONE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE)  # the SuperNode is no longer there
_REASON = re.compile(r"^<class '([\w.]+)'>:<'(.*)'>$", re.S)


def error_text(msg: Message) -> str:
    """A readable one-line reason of an error reply (Flower wraps ClientApp exceptions)."""
    err = msg.error
    reason = str(err.reason)
    m = _REASON.match(reason)
    if m:
        reason = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2)}"
    names = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}
    return f"{names.get(err.code, f'error {err.code}')}: {reason}"


class LegoStrategy(Strategy):
    """LEGO rounds over Flower's Grid, delegating every decision and all algebra to ``Server``.

    Args:
        server: the legokit server (blocks' masks, global adapter, aggregation).
        run: the run directory (checkpoints, metrics); the strategy continues after ``run.last_round``.
        options: Flower-only settings (timeouts, poll interval).
        log: where progress lines go (the ServerApp's log).
    """

    def __init__(self, server: Server, run: RunDir, options: FlowerOptions, log: Callable[[str], None] = print):
        self.server, self.run, self.options, self.log = server, run, options, log
        self.cfg = server.cfg
        self.block_ids = [b.id for b in server.blocks]
        self.clients: dict[int, int] = {}  # client -> node id serving it
        self.nodes: dict[int, dict] = {}  # node id -> {"status": ok | rejected | lost, "client", "reason", ...}
        self._lines: dict[int, dict] = {}  # client -> this round's metrics line
        self._sent: dict[str, int] = {}  # message id -> client, for this round's train messages
        self._round_start = 0.0
        self._exchanged = 0.0  # when the round's last reply arrived (or its deadline passed)

    # ----- which SuperNode is which client ------------------------------------------------------------
    def discover(self, grid: Grid, wait: float) -> None:
        """Query SuperNodes not seen before; wait up to ``wait`` s until every client has one."""
        n = self.cfg.fed.num_clients
        deadline = time.time() + wait
        announced = False
        while True:
            new = sorted(set(grid.get_node_ids()) - set(self.nodes))
            if new:
                msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                                message_type=MessageType.QUERY) for node in new]
                replies, sent = self._exchange(grid, msgs, self.options.round_timeout)
                for reply in replies:
                    self._admit(sent[reply.metadata.reply_to_message_id].metadata.dst_node_id, reply)
                for node in set(new) - set(self.nodes):
                    self.nodes[node] = {"status": "lost", "client": None,
                                        "reason": f"no answer to the query within {self.options.round_timeout} s"}
                self._write_nodes()
            if len(self.clients) == n or time.time() >= deadline:
                break
            if not announced:
                self.log(f"waiting up to {wait:.0f} s for a SuperNode per client ({len(self.clients)}/{n} so far)")
                announced = True
            time.sleep(min(1.0, max(0.05, deadline - time.time())))
        missing = sorted(set(range(n)) - set(self.clients))
        if wait and missing:
            self.log(f"no SuperNode serves clients {missing}; they are recorded as failed in every round")

    def _admit(self, node: int, reply: Message) -> None:
        """Map a SuperNode to its client from its query reply, or reject it with a reason."""
        n = self.cfg.fed.num_clients
        entry: dict = {"status": "rejected", "client": None}
        self.nodes[node] = entry
        if reply.has_error():
            entry["reason"] = error_text(reply)
            self.log(f"SuperNode {node} rejected: {entry['reason']}")
            return
        info = reply.content["info"]
        k, declared = info.get("partition-id"), str(info.get("block-id", ""))
        entry.update(client=k, declared_block=declared or None, num_examples=info.get("num-examples"))
        if not isinstance(k, int) or not 0 <= k < n:
            entry["reason"] = f"partition-id {k!r} is out of range 0..{n - 1} (fed.num_clients={n})"
        elif k in self.clients and self.nodes[self.clients[k]]["status"] == "ok":
            entry["reason"] = f"client {k} is already served by SuperNode {self.clients[k]}"
        elif declared and declared not in self.block_ids:
            entry["reason"] = (f"its device holds block {declared!r}, unknown to the server "
                               f"(known blocks: {self.block_ids})")
        if "reason" in entry:
            self.log(f"SuperNode {node} rejected: {entry['reason']}")
            return
        if declared and declared != self.block_ids[self.server.assignment[k]]:
            self.log(f"client {k} holds block {declared} (assigned: {self.block_ids[self.server.assignment[k]]}); "
                     "using its block's masks")
            self.server.assignment[k] = self.block_ids.index(declared)
        entry["status"] = "ok"
        self.clients[k] = node
        self.server.num_examples[k] = int(info.get("num-examples", 0))
        self.log(f"SuperNode {node} serves client {k} (block {self.block_ids[self.server.assignment[k]]})")

    def _drop(self, client: int, reason: str) -> None:
        node = self.clients.pop(client, None)
        if node is not None:
            self.nodes[node].update(status="lost", reason=reason)
            self._write_nodes()

    def _write_nodes(self) -> None:
        atomic_write_json(self.run.path / "nodes.json", {str(k): v for k, v in sorted(self.nodes.items())})

    # ----- Flower's Strategy interface ----------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One ``train`` message per sampled client that has a SuperNode (``arrays`` is unused: the global
        state lives in ``Server``, and in ``local`` mode each client starts from its own adapter)."""
        self._lines, self._round_start = {}, time.time()
        msgs, records = [], {}
        for k in self.server.sample(server_round):
            block = self.server.blocks[self.server.assignment[k]]
            line = {"round": server_round, "client": k, "block": block.id, "sparsity": block.sparsity}
            self._lines[k] = line
            node = self.clients.get(k)
            if node is None:
                line.update(status="failed", error=f"no SuperNode serves client {k} (node config partition-id={k})")
                continue
            factors, scaling = self.server.start_state(k)
            if id(factors) not in records:  # the same global adapter is converted once per round
                records[id(factors)] = factors_to_record(factors)
            init = records[id(factors)]
            content = RecordDict({"init": init, "config": ConfigRecord(
                {"round": server_round, "client": k, "block-id": block.id, "scaling": float(scaling)})})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round)))
            line.update(node=node, bytes_down=record_nbytes(init))
        return msgs

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the survivors with ``Server.aggregate``, checkpoint the round."""
        results: list[ClientResult] = []
        replied = set()
        for reply in replies:
            k = self._sent.get(reply.metadata.reply_to_message_id)
            if k is None or k not in self._lines:
                continue  # a late reply to an earlier round
            replied.add(k)
            line = self._lines[k]
            try:
                res = self._result(k, reply)
                self.server.validate(res)
            except LegokitError as err:
                line.update(status="failed", error=str(err))
                self.log(f"round {server_round}: client {k} failed: {err}")
                if reply.has_error() and reply.error.code in _GONE:
                    self._drop(k, f"unavailable in round {server_round}")
                continue
            results.append(res)
            line.update(status="ok", num_examples=res.num_examples, **res.metrics)
            line["update_norm"] = float(sum(float((res.scaling * b @ a).square().sum())
                                            for a, b in res.factors.values()) ** 0.5)
            line["bytes_up"] = record_nbytes(reply.content["factors"])
        accepted = set(self._sent.values())
        for k, line in self._lines.items():
            if "status" in line or k in replied:
                continue
            if k not in accepted:
                line.update(status="failed", error="the SuperLink did not accept the train message")
                continue
            line.update(status="failed", error=f"no reply within round-timeout={self.options.round_timeout} s")
            self.log(f"round {server_round}: client {k} sent no reply in time; its SuperNode is dropped")
            self._drop(k, f"no reply in round {server_round}")
        results.sort(key=lambda r: r.client)  # the in-process loop's order, so sums add up the same way
        round_line = self.server.aggregate(server_round, results)
        self.server.save(self.run.path, server_round)
        lines = [self._lines[k] for k in sorted(self._lines)]
        if self._exchanged:  # configure + messages out + clients' work + replies in; the rest is aggregation
            round_line["seconds_exchange"] = round(self._exchanged - self._round_start, 3)
        round_line.update(seconds=round(time.time() - self._round_start, 3),
                          failed=[ln["client"] for ln in lines if ln["status"] != "ok"],
                          bytes_down=sum(ln.get("bytes_down", 0) for ln in lines),
                          bytes_up=sum(ln.get("bytes_up", 0) for ln in lines))
        self.run.finish_round(server_round, lines, round_line)
        self.log(f"round {server_round}: {len(results)}/{len(lines)} clients aggregated, "
                 f"{round_line['bytes_down']} B down, {round_line['bytes_up']} B up, {round_line['seconds']} s")
        metrics = {"clients": len(results), "failed": len(lines) - len(results),
                   "bytes-down": round_line["bytes_down"], "bytes-up": round_line["bytes_up"]}
        if "energy_kept_mean" in round_line:
            metrics["energy-kept-mean"] = round_line["energy_kept_mean"]
        ok = [ln for ln in lines if ln["status"] == "ok"]
        if ok:
            metrics["loss-last-mean"] = sum(ln["loss_last"] for ln in ok) / len(ok)
        arrays = None if self.server.merged or self.cfg.fed.aggregator == "local" else \
            factors_to_record(self.server.global_factors)
        return arrays, MetricRecord(metrics)

    def _result(self, k: int, reply: Message) -> ClientResult:
        """A reply -> ``ClientResult``; an error reply or malformed content raises ``LegokitError``."""
        if reply.has_error():
            raise LegokitError(error_text(reply))
        content = reply.content
        for key in ("factors", "metrics", "info"):
            if key not in content:
                raise LegokitError(f"client {k} sent a reply without {key!r}")
        info, m = content["info"], content["metrics"]
        expected = self.block_ids[self.server.assignment[k]]
        block_id = str(info.get("block-id", ""))
        if block_id not in self.block_ids:
            raise LegokitError(f"client {k} trained block {block_id!r}, unknown to the server "
                               f"(known blocks: {self.block_ids}); update rejected")
        if block_id != expected:
            raise LegokitError(f"client {k} trained block {block_id!r} but the server holds it on {expected!r}; "
                               "update rejected (its mask would be wrong)")
        if info.get("client") != k:
            raise LegokitError(f"reply from client {k}'s SuperNode says client {info.get('client')!r}")
        factors = factors_from_record(content["factors"], f"client {k}")
        metrics = {"loss_first": float(m["loss-first"]), "loss_last": float(m["loss-last"]),
                   "losses": [float(x) for x in info.get("losses", [])], "steps": int(m["steps"]),
                   "tokens": int(m["tokens"]), "seconds": float(m["seconds"]),
                   "tokens_per_second": float(m["tokens-per-second"]),
                   "tasks": json.loads(str(info.get("tasks", "{}")))}
        if "process-seconds" in m:
            metrics["clientapp_process_seconds"] = float(m["process-seconds"])
        return ClientResult(k, factors, float(info["scaling"]), int(m["num-examples"]), metrics)

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
        self.log(f"LegoStrategy: {fed.num_clients} clients, {fed.rounds} rounds, aggregator {fed.aggregator}, "
                 f"broadcast {fed.broadcast}, blocks {self.block_ids}, round-timeout {self.options.round_timeout} s")

    # ----- the round loop -----------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Callable | None = None) -> Result:
        """Run the remaining rounds: discover SuperNodes, then configure -> exchange -> aggregate per round.

        Replaces Flower's generic loop to add what LEGO needs: SuperNode discovery, a round deadline that
        aggregates over the survivors, a faster reply poll, and checkpoint / resume through ``RunDir``.
        ``initial_arrays`` and ``timeout`` are accepted for interface compatibility (the server holds
        the initial state; ``round-timeout`` is the deadline unless ``timeout`` is given).
        """
        if timeout is not None:
            self.options = FlowerOptions(**{**vars(self.options), "round_timeout": float(timeout)})
        rounds = num_rounds or self.cfg.fed.rounds
        self.summary()
        self.discover(grid, self.options.nodes_timeout)
        if not self.clients:
            raise LegokitError(f"no usable SuperNode joined within nodes-timeout={self.options.nodes_timeout} s "
                               f"(see {self.run.path / 'nodes.json'}): start one per client with "
                               "`flower-supernode ... --node-config 'partition-id=K'`")
        result = Result()
        for rnd in range(self.run.last_round + 1, rounds + 1):
            self.discover(grid, 0.0)  # SuperNodes that joined or restarted since
            msgs = list(self.configure_train(rnd, ArrayRecord(), train_config or ConfigRecord(), grid))
            replies, sent = self._exchange(grid, msgs, self.options.round_timeout)
            self._exchanged = time.time()
            self._sent = {mid: int(m.content["config"]["client"]) for mid, m in sent.items()}
            arrays, metrics = self.aggregate_train(rnd, replies)
            if arrays is not None:
                result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[rnd] = metrics
        return result

    def _exchange(self, grid: Grid, msgs: list[Message], timeout: float) -> tuple[list[Message], dict[str, Message]]:
        """Push ``msgs``, pull replies until all arrived or ``timeout`` s passed.

        Returns:
            (replies, {message id: message} of the messages the SuperLink accepted).
        """
        if not msgs:
            return [], {}
        accepted = {i for i in grid.push_messages(msgs) if i}
        sent = {m.metadata.message_id: m for m in msgs if m.metadata.message_id in accepted}
        waiting, replies = set(sent), []
        deadline = time.time() + timeout
        while waiting:
            for reply in grid.pull_messages(list(waiting)):
                mid = reply.metadata.reply_to_message_id
                if mid in waiting:
                    waiting.discard(mid)
                    replies.append(reply)
            if not waiting or time.time() >= deadline:
                break
            time.sleep(self.options.poll_interval)
        return replies, sent
