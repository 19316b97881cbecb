"""The client runner of ``legokit.federation.Federation`` over Flower: a round's tasks go out to the SuperNodes as
``train`` messages, their replies come back as ``Outcome``s.

Which SuperNode is which client: at start (and at every round for SuperNodes that joined since) the runner
sends a ``query`` message; the ClientApp answers with its ``partition-id`` (from its node config) and,
optionally, the block id its device holds. A SuperNode with a bad partition id, a duplicate, or a block id the
server does not know is rejected and recorded in ``nodes.json``.

Failures: a reply that carries an error, a reply that is malformed, and no reply before ``round-timeout`` become
failed outcomes (``Federation.finish`` records them in ``metrics.jsonl`` with status ``failed``; the round
aggregates over the survivors). A SuperNode that missed a deadline or that the SuperLink reports unavailable is
dropped; it rejoins by restarting (a restarted SuperNode has a new node id and is queried again).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from legokit.federation import Exchange, Outcome
from legokit.flower.messages import factors_from_record, factors_to_record, record_nbytes
from legokit.flower.runconfig import FlowerOptions
from legokit.messages import ClientResult, Task
from legokit.strategy import LegoStrategy
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


class SuperNodeClients:
    """Runs a round's tasks on the SuperNodes of a Grid (``Federation``'s client runner, as ``InProcessClients``
    is in one process).

    Args:
        lego: the legokit strategy (its blocks' ids; a SuperNode that declares another block is reassigned).
        options: Flower-only settings (round deadline, reply poll interval, how long to wait for SuperNodes).
        run_dir: where ``nodes.json`` (which SuperNode serves which client) is written.
        log: where progress lines go (the ServerApp's log).
    """

    def __init__(self, lego: LegoStrategy, options: FlowerOptions, run_dir: Path,
                 log: Callable[[str], None] = print):
        self.lego, self.options, self.run_dir, self.log = lego, options, Path(run_dir), log
        self.cfg = lego.cfg
        self.block_ids = [b.id for b in lego.blocks]
        self.grid: Grid | None = None  # set by ``FlowerStrategy.start``
        self.clients: dict[int, int] = {}  # client -> node id serving it
        self.nodes: dict[int, dict] = {}  # node id -> {"status": ok | rejected | lost, "client", "reason", ...}
        self._tasks: dict[int, Task] = {}  # client -> this round's task
        self._records: dict[int, dict] = {}  # client -> what this round's metrics line adds (node, bytes)
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
        if declared and declared != self.lego.block_of(k).id:
            self.log(f"client {k} holds block {declared} (assigned: {self.lego.block_of(k).id}); "
                     "using its block's masks")
            self.lego.assign(k, self.block_ids.index(declared))
        entry["status"] = "ok"
        self.clients[k] = node
        self.log(f"SuperNode {node} serves client {k} (block {self.lego.block_of(k).id})")

    def _drop(self, client: int, reason: str) -> None:
        node = self.clients.pop(client, None)
        if node is not None:
            self.nodes[node].update(status="lost", reason=reason)
            self._write_nodes()

    def _write_nodes(self) -> None:
        atomic_write_json(self.run_dir / "nodes.json", {str(k): v for k, v in sorted(self.nodes.items())})

    # ----- one round -----------------------------------------------------------------------------------
    def __call__(self, tasks: list[Task]) -> Exchange:
        """The client runner of ``Federation``: one round's tasks out to the SuperNodes, their replies back."""
        self.discover(self.grid, 0.0)  # SuperNodes that joined or restarted since
        msgs = self._messages(tasks)
        replies, sent = self._exchange(self.grid, msgs, self.options.round_timeout)
        self._exchanged = time.time()
        self._sent = {mid: int(m.content["config"]["client"]) for mid, m in sent.items()}
        return self._collect(replies)

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

    def _messages(self, tasks: list[Task]) -> list[Message]:
        """The round's tasks as ``train`` messages; a task whose client has no SuperNode fails at once."""
        self._tasks, self._records, self._round_start = {t.client: t for t in tasks}, {}, time.time()
        msgs, records = [], {}
        for t in tasks:
            node = self.clients.get(t.client)
            self._records[t.client] = {}
            if node is None:
                continue
            if id(t.factors) not in records:  # the same global adapter is converted once per round
                records[id(t.factors)] = factors_to_record(t.factors)
            init = records[id(t.factors)]
            content = RecordDict({"init": init, "config": ConfigRecord(
                {"round": t.round, "client": t.client, "block-id": self.block_ids[t.block],
                 "scaling": float(t.scaling)})})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(t.round)))
            self._records[t.client].update(node=node, bytes_down=record_nbytes(init))
        return msgs

    def _collect(self, replies: Iterable[Message]) -> Exchange:
        """Every task's outcome from the replies; a task without a (timely) reply fails with the reason."""
        outcomes: dict[int, Outcome] = {}
        for reply in replies:
            k = self._sent.get(reply.metadata.reply_to_message_id)
            if k is None or k not in self._tasks:
                continue  # a late reply to an earlier round
            out = outcomes[k] = Outcome(self._tasks[k], record=self._records[k])
            try:
                out.result = self._result(k, reply)
                out.record["bytes_up"] = record_nbytes(reply.content["factors"])
            except LegokitError as err:
                out.error = str(err)
                if reply.has_error() and reply.error.code in _GONE:
                    self._drop(k, f"unavailable in round {out.task.round}")
        accepted = set(self._sent.values())
        for k, task in self._tasks.items():
            if k in outcomes:
                continue
            if k not in self.clients and k not in accepted:
                error = f"no SuperNode serves client {k} (node config partition-id={k})"
            elif k not in accepted:
                error = "the SuperLink did not accept the train message"
            else:
                error = f"no reply within round-timeout={self.options.round_timeout} s"
                self.log(f"round {task.round}: client {k} sent no reply in time; its SuperNode is dropped")
                self._drop(k, f"no reply in round {task.round}")
            outcomes[k] = Outcome(task, error=error, record=self._records[k])
        record = {"bytes_down": sum(r.get("bytes_down", 0) for r in self._records.values()),
                  "bytes_up": sum(r.get("bytes_up", 0) for r in self._records.values())}
        if self._exchanged:  # configure + messages out + clients' work + replies in; the rest is aggregation
            record["seconds_exchange"] = round(self._exchanged - self._round_start, 3)
        return Exchange(list(outcomes.values()), record)

    def _result(self, k: int, reply: Message) -> ClientResult:
        """A reply -> ``ClientResult``; an error reply or malformed content raises ``LegokitError``."""
        if reply.has_error():
            raise LegokitError(error_text(reply))
        content = reply.content
        for key in ("factors", "metrics", "info"):
            if key not in content:
                raise LegokitError(f"client {k} sent a reply without {key!r}")
        info, m = content["info"], content["metrics"]
        check_reply_info(k, info, self.block_ids, self.lego.block_of(k).id)
        factors = factors_from_record(content["factors"], f"client {k}")
        metrics = client_metrics(m, info)
        return ClientResult(k, factors, float(info["scaling"]), int(m["num-examples"]), metrics)


def check_reply_info(k: int, info: Mapping, block_ids: Sequence[str], expected: str) -> None:
    """A reply's ``block-id`` and ``client`` against the server's view; raises ``LegokitError`` naming the problem."""
    block_id = str(info.get("block-id", ""))
    if block_id not in block_ids:
        raise LegokitError(f"client {k} trained block {block_id!r}, unknown to the server "
                           f"(known blocks: {list(block_ids)}); update rejected")
    if block_id != expected:
        raise LegokitError(f"client {k} trained block {block_id!r} but the server holds it on {expected!r}; "
                           "update rejected (its mask would be wrong)")
    if info.get("client") != k:
        raise LegokitError(f"reply from client {k}'s SuperNode says client {info.get('client')!r}")


def client_metrics(m: Mapping, info: Mapping) -> dict:
    """A client's metrics line from its reply's metrics and info (lists travel as JSON strings)."""
    losses = info.get("losses", [])
    metrics = {"loss_first": float(m["loss-first"]), "loss_last": float(m["loss-last"]),
               "losses": [float(x) for x in (json.loads(losses) if isinstance(losses, str) else losses)],
               "steps": int(m["steps"]), "tokens": int(m["tokens"]), "seconds": float(m["seconds"]),
               "tokens_per_second": float(m["tokens-per-second"]), "tasks": json.loads(str(info.get("tasks", "{}")))}
    if "process-seconds" in m:
        metrics["clientapp_process_seconds"] = float(m["process-seconds"])
    return metrics
