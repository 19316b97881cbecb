"""legokit: a notebook-first research workbench for LEGO (Language Model Building Blocks).

Prune one LLM into small language models of different sparsity, fine-tune each federatedly with
masked LoRA, recombine the heterogeneous adapters with HeteAgg, and broadcast the update back.
Import the submodules you need (``legokit.models``, ``legokit.prune``, ...); importing the
package itself has no side effects.

The layout, in the order a run uses it (README.md's "Layout" has the same map):

- names (every allowed name, the conditions), config, architectures (the supported decoder families), models,
  utils, assets (the offline model and data)
- data/ (tasks, prepared splits, prompts and tokens, partitions)
- prune (scores, masks), sparsegpt, calibration; blocks (+ block_storage), coords, slm (an SLM as views)
- lora (the masked layer), adapters (peft format), train
- messages (a round's Task and ClientResult, its seeds), client, aggregate, strategy (conditions as
  strategy attributes), broadcast, checkpoint, federation (the one round loop)
- metrics, likelihood (the packed scorer), evaluate (scoring's one home), lmeval, stats
- experiment (runs conditions), learning (the gate), evidence (paired intervals), claims (judges them)
- grid, sweep (runs), sweepdir (reads sweep directories), report (tables and ``legokit report``)
- studio (the LEGO Studio's controller: data only); presentation: viz/, widgets/; analysis/ (the notebooks'
  data tables)
- plan (which block a memory budget holds, from a model's shapes), audit (membership inference on a run);
  privacy/ (exposure, the privacy settings, the accountant, the differentially private owner mean)
- cli; flower/ (ServerApp, ClientApp, SuperNode client runner, SecAgg+, launchers)

The import rule: legokit modules import each other at module top level. An import inside a function is only
for (a) a heavy optional dependency (flwr in the launchers, lm_eval, matplotlib, seaborn, ipywidgets, IPython,
papermill), (b) breaking a real import cycle, or (c) the command line, whose commands import their stage when
they run so that ``legokit --help`` answers without loading torch; each such import says which in a comment
or its module docstring. The core never imports the presentation layer (``viz``, ``widgets``, plotting
libraries): ``tests/test_layers.py`` holds this.
"""

__version__ = "0.1.0"
