"""Recommendations from a saved model in one call, without its data folder.

::

    from genrec_fast import Recommender
    rec = Recommender.from_pretrained("runs/sft/model")           # model + tokenizer + its bundle
    out = rec.recommend([["B0001", "B0042"], ["B0007"]], k=10)    # one history per user, oldest first
    out[0].item_ids, out[0].scores, out[0].titles

The model directory's bundle (``genrec_bundle.json`` + ``sid_index/``, :mod:`genrec_fast.bundle`) gives the
item ids, their SIDs and titles, and the prompt style the model was trained with. Each history is prompted
as in evaluation (:func:`genrec_fast.prompts.rec_prompt`) and decoded by constrained beam search over the
trie of the catalogue's SIDs (:func:`genrec_fast.eval.predict`); an item's score is its beam's
log-probability (items that share a SID share its score). The items of the beams come in beam order, so a
user gets ``k`` items when the beams hold that many (``num_beams`` defaults to ``k``). The hybrid of
``genrec_fast.eval.hybrid`` is there too: ``rec.recommend(histories, k, transitions=rec.transitions(train_sequences),
hybrid_weight=W)`` re-ranks the beams with last-item transition counts. ``rec.recommend(histories, k,
ensemble=[Recommender.from_pretrained(other_dir), ...])`` ranks by the product of experts of this model and models
trained on other SIDs of the same items (``genrec_fast.eval.ensemble``; an item's score is then the members' mean
log-probability of it).

``Recommender.from_pretrained(dir, search=SearchOptions(cuda_graphs=True, graph_scope="search"))`` runs its searches
as :mod:`genrec_fast.decode.options` says (``genrec-fast recommend --cuda-graphs --graph-scope search``).

CLI: ``genrec-fast recommend --model DIR --history ID [ID ...] [--k 10] [--ensemble-models DIR2 ...]`` prints a
table.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from genrec_fast.bundle import BUNDLE_FILE, Bundle, read_bundle
from genrec_fast.config_cli import add_dataclass_arguments, option
from genrec_fast.data.types import Catalog, Sample
from genrec_fast.decode.options import SearchOptions, check_search_options
from genrec_fast.eval.baselines import TransitionTable
from genrec_fast.eval.beams import catalog_trie, predict
from genrec_fast.eval.ensemble import Member, check_same_items, ensemble_predict
from genrec_fast.eval.hybrid import TransitionReranker, check_weight, sequence_transitions
from genrec_fast.eval.metrics import INVALID_SLOT
from genrec_fast.model import load_model_and_tokenizer
from genrec_fast.prompts import PROMPT_STYLES, check_prompt_style

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class Recommendation:
    """One user's recommended items, best first: ids, beam log-probabilities (with the hybrid: its scores) and
    titles."""

    item_ids: List[str]
    scores: List[float]
    titles: List[str]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None / "auto": CUDA when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """None / "auto": bfloat16 on CUDA, float32 elsewhere (as ``genrec-fast eval``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {list(DTYPES)}")
    return getattr(torch, dtype)


def history_indices(catalog: Catalog, histories: Sequence[Sequence], source="the catalogue") -> List[List[int]]:
    """Catalogue indices of each history; ValueError naming the user (0-based) and the item id that is not
    in ``catalog`` (read from ``source``), or a history that is empty or not a list."""
    if isinstance(histories, (str, bytes)) or not isinstance(histories, Sequence):
        raise ValueError(f"histories must be a list of histories (one list of item ids per user), "
                         f"got {type(histories).__name__}")
    out = []
    for u, history in enumerate(histories):
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise ValueError(f"user {u}: a history must be a list of item ids, got {type(history).__name__} "
                             f"{history!r} (histories is one list of item ids per user)")
        if len(history) == 0:
            raise ValueError(f"user {u}: empty history (at least one item id is needed)")
        row = []
        for j, item in enumerate(history):
            try:
                row.append(catalog.index(item))
            except KeyError:
                raise ValueError(f"user {u}: item id {str(item)!r} (position {j} of the history) is not in the "
                                 f"model's catalogue ({len(catalog)} items, {source})") from None
        out.append(row)
    return out


class Recommender:
    """A model, its tokenizer and SID vocabulary, and the bundle's catalogue and trie, ready to recommend.

    ``prompt_style`` None: the bundle's (the style the model was trained with); a name of
    :data:`genrec_fast.prompts.PROMPT_STYLES` overrides it. ``search``: how its beam searches run
    (:class:`genrec_fast.decode.options.SearchOptions`: CUDA graphs, one graph per search, the prompt's K/V once
    per prompt, the fused log-sum-exp; default: none of them), in an ensemble too.
    """

    def __init__(self, model, tokenizer, sid_vocab, bundle: Bundle, prompt_style: Optional[str] = None,
                 score: str = "full_vocab", backend: str = "auto", search: Optional[SearchOptions] = None):
        if tuple(sid_vocab.codebook_sizes) != tuple(bundle.codebook_sizes):
            raise ValueError(f"{bundle.directory / BUNDLE_FILE}: codebook sizes {list(bundle.codebook_sizes)}, but "
                             f"the model's SID tokens have {list(sid_vocab.codebook_sizes)}")
        self.model, self.tokenizer, self.sid_vocab, self.bundle = model, tokenizer, sid_vocab, bundle
        self.prompt_style = check_prompt_style(bundle.prompt_style if prompt_style is None else prompt_style)
        self.score, self.backend = score, backend
        self.search = SearchOptions() if search is None else search
        check_search_options("Recommender", self.search)
        self.catalog = bundle.catalog()
        self.trie = catalog_trie(self.catalog)

    @classmethod
    def from_pretrained(cls, model_dir: Union[str, Path], prompt_style: Optional[str] = None,
                        device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
                        score: str = "full_vocab", backend: str = "auto",
                        search: Optional[SearchOptions] = None) -> "Recommender":
        """Load a saved model directory that holds a bundle (FileNotFoundError naming the file without one).
        ``device`` None: CUDA when there is one; ``dtype`` None: bfloat16 on CUDA, float32 on the CPU."""
        bundle = read_bundle(model_dir)
        dev = resolve_device(device)
        model, tokenizer, sid_vocab = load_model_and_tokenizer(str(model_dir), bundle.codebook_sizes, device=dev,
                                                               torch_dtype=resolve_dtype(dtype, dev))
        return cls(model, tokenizer, sid_vocab, bundle, prompt_style=prompt_style, score=score, backend=backend,
                   search=search)

    def member(self) -> Member:
        """This model as a member of an ensemble (``genrec_fast.eval.ensemble``), on its bundle's SIDs."""
        return Member(self.model, self.tokenizer, self.sid_vocab, self.catalog, self.prompt_style)

    def history_indices(self, histories: Sequence[Sequence]) -> List[List[int]]:
        """Catalogue indices of each history (:func:`history_indices`)."""
        return history_indices(self.catalog, histories, self.bundle.directory / BUNDLE_FILE)

    def transitions(self, sequences: Sequence[Sequence]) -> TransitionTable:
        """The last-item transition counts of user sequences (item ids as in the catalogue, oldest first; e.g.
        the interactions the model was trained on), for :meth:`recommend`'s hybrid."""
        return sequence_transitions(self.history_indices(sequences), len(self.catalog))

    def recommend(self, histories: Sequence[Sequence], k: int = 10, num_beams: Optional[int] = None,
                  batch_size: int = 16, max_prompt_length: Optional[int] = None,
                  transitions: Optional[TransitionTable] = None,
                  hybrid_weight: Optional[float] = None,
                  ensemble: Sequence["Recommender"] = ()) -> List[Recommendation]:
        """The top ``k`` items for each history (item ids as in the catalogue, oldest first).

        ``num_beams`` (default ``k``, at least ``k``): beams of the constrained search. A prompt longer than
        the model's positions is an error naming the user, unless ``max_prompt_length`` keeps its last tokens.
        ``transitions`` (:meth:`transitions`) with ``hybrid_weight``: the hybrid (``genrec_fast.eval.hybrid``):
        every beam's items re-ranked by beam log-prob + hybrid_weight * log(1 + count(last history item ->
        item)), the top ``k`` kept, each with that score; ``num_beams`` then defaults to max(k, 50), as the
        hybrid was measured.
        ``ensemble``: other Recommenders of the same items (the same item ids in the same order) on their own SIDs;
        the items of every member's ``num_beams`` beams are ranked by the members' mean log-probability
        (:func:`genrec_fast.eval.ensemble.ensemble_predict`), each item's score that mean (with the hybrid, the
        re-ranking starts from those scores).
        """
        for name, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"recommend: {name} must be an integer >= 1, got {value!r}")
        if (transitions is None) != (hybrid_weight is None):
            raise ValueError("recommend: the hybrid needs both transitions (Recommender.transitions) and "
                             "hybrid_weight; give both or neither")
        hybrid = transitions is not None
        if hybrid:
            check_weight(hybrid_weight, "recommend: hybrid_weight")
        beams = (max(k, 50) if hybrid else k) if num_beams is None else num_beams
        if isinstance(beams, bool) or not isinstance(beams, int) or beams < k:
            raise ValueError(f"recommend: num_beams must be an integer >= k={k}, got {num_beams!r}")
        rows = self.history_indices(histories)
        samples = [Sample(user_id=str(u), history=row, target=-1) for u, row in enumerate(rows)]
        how = dict(backend=self.backend, cuda_graphs=self.search.cuda_graphs,
                   search_options=self.search.search_kwargs())
        if ensemble:
            records = ensemble_predict([self.member(), *(r.member() for r in ensemble)], samples, num_beams=beams,
                                       top_n=len(self.catalog) if hybrid else k, batch_size=batch_size,
                                       max_prompt_length=max_prompt_length, **how)
        else:
            records = predict(self.model, self.tokenizer, self.sid_vocab, self.trie, samples, self.catalog,
                              num_beams=beams, batch_size=batch_size, top_n=beams if hybrid else k, score=self.score,
                              max_prompt_length=max_prompt_length, prompt_style=self.prompt_style, with_scores=True,
                              **how)
        if hybrid:
            reranker = TransitionReranker(transitions)
            for r, row in zip(records, rows):
                r["ranked"], r["scores"] = reranker.rerank_scored(r["ranked"], r["scores"], row[-1], hybrid_weight)
        out = []
        for r in records:
            kept = [(i, s) for i, s in zip(r["ranked"], r["scores"]) if i != INVALID_SLOT][:k]
            out.append(Recommendation(item_ids=[self.catalog.item_ids[i] for i, _ in kept],
                                      scores=[float(s) for _, s in kept],
                                      titles=[self.catalog.titles[i] for i, _ in kept]))
        return out


def format_recommendations(rec: Recommendation) -> str:
    """A table: rank, item id, score (beam log-probability), title."""
    w = max([len("item_id")] + [len(i) for i in rec.item_ids])
    lines = [f"{'rank':>4}  {'item_id':<{w}}  {'score':>9}  title"]
    lines += [f"{n:>4}  {item:<{w}}  {score:>9.4f}  {title}"
              for n, (item, score, title) in enumerate(zip(rec.item_ids, rec.scores, rec.titles), 1)]
    return "\n".join(lines)


# ---- ``genrec-fast recommend`` -----------------------------------------------------------------

@dataclass
class RecommendConfig(SearchOptions):
    """The options of ``genrec-fast recommend`` (flags generated by ``genrec_fast.config_cli``); the beam-search ones
    from :class:`genrec_fast.decode.options.SearchOptions`."""

    model: str = option("", "saved model directory holding a bundle (genrec_bundle.json, sid_index/); no data folder "
                            "is needed")
    history: Tuple[str, ...] = option((), "the user's item ids as in the catalogue, oldest first")
    k: int = option(10, "items to recommend")
    ensemble_models: Tuple[str, ...] = option((), "other saved models of the same items, each on its own SIDs (its "
                                                  "bundle): rank by the models' product of experts "
                                                  "(genrec_fast.eval.ensemble) (default: none: this model alone)")
    num_beams: Optional[int] = option(None, "beams of the constrained beam search, at least --k (default: --k)")
    prompt_style: Optional[str] = option(None, "prompt template (default: the one the model was trained with, from "
                                               "its bundle)", choices=PROMPT_STYLES)
    max_prompt_length: Optional[int] = option(None, "keep the prompt's last this many tokens (default: the whole "
                                                    "prompt; one that does not fit the model's positions is an error)")
    score: str = option("full_vocab", "beam scores: log-softmax over the full vocabulary or over the SID tokens only",
                        choices=("full_vocab", "sid"))
    backend: str = option("auto", "beam-step kernels (auto: Triton on CUDA, torch otherwise)",
                          choices=("auto", "triton", "torch"))
    device: str = option("auto", "torch device (auto: cuda when there is one, else cpu)")
    dtype: str = option("auto", "model dtype (auto: bfloat16 on CUDA, float32 on CPU)", choices=DTYPES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`RecommendConfig` field; model and history required."""
    add_dataclass_arguments(parser, RecommendConfig, required=("model", "history"))


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if args.num_beams is not None and args.num_beams < args.k:
        raise ValueError(f"--num-beams must be >= --k ({args.k}), got {args.num_beams}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        raise ValueError(f"--max-prompt-length must be >= 1, got {args.max_prompt_length}")
    search = SearchOptions(**{f.name: getattr(args, f.name) for f in fields(SearchOptions)})
    check_search_options("recommend", search)
    bundle = read_bundle(args.model)  # the history and the members' items are checked before a model is loaded
    history_indices(bundle.catalog(), [args.history], bundle.directory / BUNDLE_FILE)
    for other in args.ensemble_models:
        check_same_items(read_bundle(other).item_ids, bundle.item_ids, f"--ensemble-models {other}: its bundle",
                         f"--model {args.model}'s")
    load = dict(prompt_style=args.prompt_style, device=args.device, dtype=args.dtype, score=args.score,
                backend=args.backend, search=search)
    rec = Recommender.from_pretrained(args.model, **load)
    members = [Recommender.from_pretrained(other, **load) for other in args.ensemble_models]
    out = rec.recommend([args.history], k=args.k, num_beams=args.num_beams, batch_size=1,
                        max_prompt_length=args.max_prompt_length, ensemble=members)
    print(format_recommendations(out[0]))
    return 0
