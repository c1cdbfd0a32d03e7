"""How the beam searches of a command run: the options ``genrec-fast eval``, ``sft`` (its valid/test evals), ``sdpo``
and ``rl`` (their rollouts and evals) share, as one config dataclass each of their configs extends.

None of them changes what a search ranks in fp32 (the parity tests of ``tests/test_decode*.py``); in bf16 / fp16 they
change the rounding, so near-tied beams can swap. ``search_kwargs`` gives the keyword arguments of
:func:`genrec_fast.decode.beam_search` besides ``cuda_graphs`` (``genrec_fast.eval.beams.predict``'s
``search_options``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from genrec_fast.config_cli import option
from genrec_fast.decode.search import GRAPH_SCOPES
from genrec_fast.ops.backend import BACKENDS

SEARCH_OPTIONS = ("shared_prefix", "graph_scope", "lse_backend")  # beam_search's, besides cuda_graphs
_GROUP = "beam search"


@dataclass
class SearchOptions:
    """The beam-search options of a command (``--help`` lists them under "beam search")."""

    cuda_graphs: bool = option(False, "replay the beam searches' forwards from CUDA graphs (CUDA only; sdpa/eager "
                                      "attention)", group=_GROUP)
    graph_scope: str = option("forward", "with cuda_graphs: capture each forward (forward) or the whole search, "
                                         "scoring and top-k included, as one graph per shape (search)",
                              choices=GRAPH_SCOPES, group=_GROUP)
    shared_prefix: bool = option(False, "keep each prompt's K/V once, not once per beam (the beams' steps attend "
                                        "through ops.cascade; sdpa full attention only)", group=_GROUP)
    lse_backend: str = option("torch", "the full-vocabulary log-sum-exp of the beam scores: the head's matmul then a "
                                       "log-softmax (torch) or the fused Triton kernel (triton; auto: Triton on CUDA)",
                              choices=BACKENDS, group=_GROUP)

    def search_kwargs(self) -> Dict[str, Any]:
        """``beam_search``'s keyword arguments of these options, ``cuda_graphs`` left out."""
        return {name: getattr(self, name) for name in SEARCH_OPTIONS}


def check_search_options(who: str, opts) -> None:
    """ValueError naming ``who`` and the option when ``opts`` (a :class:`SearchOptions`, or any object with its
    fields, e.g. parsed flags) holds a value the search does not take."""
    if not (isinstance(opts.cuda_graphs, bool) or opts.cuda_graphs == "emulate"):
        raise ValueError(f"{who}: cuda_graphs must be true or false (or 'emulate', the Python API's CPU test of the "
                         f"graph protocol), got {opts.cuda_graphs!r}")
    if not isinstance(opts.shared_prefix, bool):
        raise ValueError(f"{who}: shared_prefix must be true or false, got {opts.shared_prefix!r}")
    if opts.graph_scope not in GRAPH_SCOPES:
        raise ValueError(f"{who}: graph_scope must be one of {GRAPH_SCOPES}, got {opts.graph_scope!r}")
    if opts.graph_scope != "forward" and not opts.cuda_graphs:
        raise ValueError(f"{who}: graph_scope {opts.graph_scope!r} needs cuda_graphs")
    if opts.lse_backend not in BACKENDS:
        raise ValueError(f"{who}: lse_backend must be one of {BACKENDS}, got {opts.lse_backend!r}")
