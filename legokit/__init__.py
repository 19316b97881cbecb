"""legokit: a notebook-first research workbench for LEGO (Language Model Building Blocks).

Prune one LLM into small language models of different sparsity, fine-tune each federatedly with
masked LoRA, recombine the heterogeneous adapters with HeteAgg, and broadcast the update back.
Import the submodules you need (``legokit.models``, ``legokit.prune``, ...); importing the
package itself has no side effects.
"""

__version__ = "0.1.0"
