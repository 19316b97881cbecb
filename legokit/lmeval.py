"""Hand legokit's items and models to lm-evaluation-harness: task files to score, checkpoints to load.

* ``export_tasks`` writes each choice task's test items as ``<task>.jsonl`` plus an lm-eval task YAML
  (``legokit_<task>``, ``output_type: multiple_choice``), so ``lm_eval run --include_path DIR`` scores
  exactly the items ``legokit.evaluate.score_items(..., scoring="harness")`` scores, and the two can be
  compared item by item (matched by ``uid``).

  Why items and not a template over the prepared files: the prepared files keep each task's raw fields,
  and ``legokit.data`` builds the cloze context from them in Python (whitespace collapsed, BoolQ passages
  clipped at a word boundary with `` ...`` appended, questions capitalised and given a question mark, the
  split and its order fixed by a seeded shuffle). A Jinja template would have to re-implement each of
  those and would drift from them silently; the exported ``context`` / ``options`` strings are the ones
  legokit scores, so lm-eval only adds its own scoring (``" " + option`` after the context).

* ``export_checkpoint`` writes a plain Hugging Face checkpoint (``model.safetensors``, ``config.json``,
  tokenizer files) of a run's final global LLM or of one block with the run's final update applied the
  way that block sees it. It rebuilds the state the way a resumed run does (the config, the blocks and
  the last finished round's adapter or merged weights; no training), then folds every LoRA update into
  its layer (``detach_lora(merge=True)``), so the directory loads with ``AutoModelForCausalLM`` and no
  legokit. Structured blocks are written at their own, smaller shape (fewer heads and MLP channels in
  ``config.json``), which is the SLM the run evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from legokit.blocks import Block
from legokit.config import ExperimentConfig
from legokit.data import TASKS, load_task
from legokit.federation import block_model, global_model
from legokit.lora import detach_lora
from legokit.models import load_model
from legokit.names import aggregator_has_global
from legokit.slm import materialize
from legokit.strategy import assign_blocks, build_strategy
from legokit.utils import LegokitError, atomic_write_json, atomic_write_text, resolve_device

DEFAULT_TASKS = ("piqa", "boolq", "commonsense_qa", "mmlu")
TASK_PREFIX = "legokit_"


def choice_tasks() -> list[str]:
    """The tasks ``export_tasks`` accepts: legokit's choice tasks (they carry a cloze context and options)."""

    return [name for name, spec in TASKS.items() if spec.kind == "choice"]


def task_yaml(task: str, data_file: Path) -> dict:
    """The lm-eval task config of one exported task (``data_file``: its items, an absolute path)."""
    return {
        "task": f"{TASK_PREFIX}{task}",
        "dataset_path": "json",  # datasets' packaged json builder: no hub access
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Plain feature names: lm-eval looks them up in the doc as they are (no Jinja, no literal_eval).
        "doc_to_text": "context",
        "doc_to_choice": "options",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def export_tasks(out_dir: str | Path, tasks: Sequence[str] = DEFAULT_TASKS, split: str = "test",
                 n: int | None = None) -> list[Path]:
    """Write ``<task>.jsonl`` (``uid, context, options, gold``) and ``<task>.yaml`` per choice task.

    Args:
        out_dir: the directory to write (created); pass it to lm-eval as ``--include_path``.
        tasks: legokit choice tasks (``choice_tasks()``); each becomes lm-eval task ``legokit_<task>``.
        split: ``test`` (default), ``validation`` or ``train`` of ``legokit.data.load_task``.
        n: the first ``n`` items of each split (its fixed shuffled order), or every item.
    Returns:
        the YAML paths, one per task, in ``tasks`` order.
    """

    valid = choice_tasks()
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise LegokitError(f"no tasks to export: choose from {', '.join(valid)}")
    bad = [t for t in tasks if t not in valid]
    if bad:
        raise LegokitError(f"cannot export {bad} for lm-eval multiple choice: valid tasks are {', '.join(valid)} "
                           "(the choice tasks; generative tasks have no options to score)")
    if n is not None and n < 1:
        raise LegokitError(f"n={n}: export at least one item per task (or n=None for all)")
    out = Path(out_dir).expanduser().resolve()  # lm-eval resolves data_files from its own working directory
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        examples = load_task(task, split)[:n]
        rows = []
        for ex in examples:
            if not ex.context or not ex.options:
                raise LegokitError(f"{task} item {ex.uid} has no cloze form (context and options); "
                                   "legokit.data must provide them for every choice task")
            rows.append({"uid": ex.uid, "context": ex.context, "options": list(ex.options), "gold": ex.answer_index})
        data = out / f"{task}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        head = (f"# lm-eval task written by legokit.lmeval.export_tasks: {len(rows)} {split} items of legokit's "
                f"{task!r}\n# (context and options as legokit scores them; match items by uid)\n")
        path = out / f"{task}.yaml"
        atomic_write_text(path, head + yaml.safe_dump(task_yaml(task, data), sort_keys=False, allow_unicode=True))
        paths.append(path)
    return paths


def lm_eval_command(task_dir: str | Path, tasks: Sequence[str], pretrained: str = "<checkpoint>",
                    batch_size: int = 8, device: str = "auto") -> str:
    """The ``lm_eval`` command line that scores exported tasks with a Hugging Face checkpoint.

    ``device="auto"`` names CUDA when present, else the CPU (lm-eval's own default is ``cuda``).
    """

    names = ",".join(f"{TASK_PREFIX}{t}" for t in tasks)
    return (f"HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval run --model hf --model_args pretrained={pretrained} "
            f"--include_path {Path(task_dir).expanduser().resolve()} --tasks {names} --device {resolve_device(device)} "
            f"--batch_size {batch_size} --log_samples --output_path <results dir>")


# ----- checkpoints ---------------------------------------------------------------------------------------
def read_run(run_dir: Path) -> tuple:
    """What a run directory says, read without loading a model: ``(config, last finished round, its adapter
    directory, block ids)``; a clear error for each way the directory can be incomplete."""

    if not (run_dir / "config.yaml").is_file():
        raise LegokitError(f"{run_dir} is not a run directory (no config.yaml); give the --out of `legokit run`")
    cfg = ExperimentConfig.from_yaml(run_dir / "config.yaml")
    state = run_dir / "state.json"
    rnd = int(json.loads(state.read_text())["round"]) if state.is_file() else 0
    if rnd < 1:
        raise LegokitError(f"run {run_dir} has no finished round (no state.json), so nothing was trained (nothing "
                           f"to export or audit); its untrained LLM is {cfg.model!r} itself "
                           "(`legokit.models.load_model`)")
    adir = run_dir / "adapters" / f"round_{rnd:03d}"
    if not adir.is_dir():
        raise LegokitError(f"run {run_dir} says round {rnd} finished but {adir} is missing; the run directory is "
                           "incomplete (copied partly?)")
    index = run_dir / "blocks" / "index.json"
    if not index.is_file():
        raise LegokitError(f"run {run_dir} has no blocks/index.json; the run directory is incomplete")
    return cfg, rnd, adir, json.loads(index.read_text())["blocks"]


def restore_strategy(run_dir: Path, device: str, dtype: str, before=None):
    """The strategy of a run directory's last finished round, rebuilt as a resumed run does: the config, the
    LLM, the saved blocks, then that round's global state. Returns ``(strategy, llm, tokenizer, round)``.

    ``before(llm, tokenizer)``, when given, is called with the untrained LLM before the round's state is loaded
    (a ``merge`` broadcast writes the global update into the LLM's weights).
    """

    cfg, rnd, adir, ids = read_run(run_dir)
    llm, tok = load_model(cfg.model, device=device, dtype=dtype)
    if before is not None:
        before(llm, tok)
    blocks = [Block.load(run_dir / "blocks" / f"{i}", llm) for i in range(len(ids))]
    strategy = build_strategy(cfg, llm, blocks, progress=False)  # the condition as the run built it
    strategy.load(adir, rnd)
    return strategy, llm, tok, rnd


def _block_index(ids: list[str], which: str) -> int:
    for i, b in enumerate(ids):
        if which in (b, str(i)):
            return i
    listing = ", ".join(f"{i}: {b}" for i, b in enumerate(ids))
    raise LegokitError(f"unknown block {which!r}: use 'global' or a block id or index ({listing})")


def _check_export(run: Path, out: Path, model: str, client: int | None, device: str) -> None:
    """Every export argument checked against the run directory before the model is loaded and rebuilt."""
    from types import SimpleNamespace


    if out.exists() and not out.is_dir():
        raise LegokitError(f"--out {str(out)!r} is an existing file; the checkpoint is a directory: give a new path "
                           "or an existing directory")
    resolve_device(device)
    cfg, _, _, ids = read_run(run)
    if len(ids) != len(cfg.prune.sparsities):
        raise LegokitError(f"run {run}: blocks/index.json lists {len(ids)} blocks but its config extracts "
                           f"{len(cfg.prune.sparsities)}; the run directory is inconsistent")
    # the blocks are extracted in prune.sparsities's order, so the assignment needs only their levels
    assignment = assign_blocks(cfg, [SimpleNamespace(sparsity=s) for s in cfg.prune.sparsities])
    clients = ", ".join(f"{k}: {ids[b]}" for k, b in enumerate(assignment))
    if not aggregator_has_global(cfg.fed.aggregator):
        if client is None:
            raise LegokitError(f"run {run} is a 'local' run: no global model, every client keeps its own adapter; "
                               f"choose one with --client K (client: block = {clients})")
        if not 0 <= client < cfg.fed.num_clients:
            raise LegokitError(f"client {client} is not in run {run} (client: block = {clients})")
        if model != "global" and _block_index(ids, model) != assignment[client]:
            raise LegokitError(f"client {client} of run {run} holds block {ids[assignment[client]]}, not {model!r}")
    elif client is not None:
        raise LegokitError(f"run {run} is a {cfg.fed.aggregator!r} run: its clients share the global update, so "
                           "a client's model is its block's; drop --client and pass --model BLOCK")
    elif model != "global":
        _block_index(ids, model)


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, model: str = "global", client: int | None = None,
                      *, device: str = "cpu", dtype: str = "auto") -> Path:
    """Write a run's final global LLM or one block as a plain Hugging Face checkpoint.

    Args:
        run_dir: a run directory of ``legokit run`` / ``run_experiment`` with at least one finished round.
        out_dir: the checkpoint directory (``model.safetensors``, ``config.json``, tokenizer files, and
            ``legokit_export.json`` recording what was exported).
        model: ``"global"`` (the LLM with the final global update, or the merged LLM), or a block id
            (``RUN/blocks/index.json``) or index: the block with the final update through its mask.
        client: ``local`` runs only (every client keeps its own adapter): the client whose block and
            adapter to export; ``model`` may then be ``"global"`` (meaning: that client's block) or its block.
        device, dtype: where and in which precision to rebuild (``"auto"``: float32 on CPU).
    Returns:
        ``out_dir``.
    """

    run, out = Path(run_dir), Path(out_dir)
    _check_export(run, out, model, client, device)
    strategy, llm, tok, rnd = restore_strategy(run, device, dtype)
    cfg, blocks = strategy.cfg, strategy.blocks
    if not strategy.has_global:
        index = strategy.assignment[client]
        what = blocks[index].id
        context = block_model(strategy, index, client)
    elif model == "global":
        index, what = None, "global"
        context = global_model(strategy, llm)
    else:
        index = _block_index([b.id for b in blocks], model)
        what = blocks[index].id
        context = block_model(strategy, index)
    with context as m:
        materialize(m)  # a block's views of the LLM's weights -> layers that hold (and save) their weights
        detach_lora(m, merge=True)  # every LoRA layer -> a plain nn.Linear holding W + M ⊙ s·BA
        out.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(out)
        tok.save_pretrained(out)
    block = blocks[index] if index is not None else None
    atomic_write_json(out / "legokit_export.json", {
        "run": str(run.resolve()), "round": rnd, "model": what, "client": client, "base_model": cfg.model,
        "aggregator": cfg.fed.aggregator, "broadcast": cfg.fed.broadcast,
        "block": None if block is None else {"index": index, "id": block.id, "sparsity": block.sparsity,
                                              "structured": block.structured},
    })
    return out
