"""Datasets: the shared containers and readers (MiniOneRec release, generic logs, MovieLens-1M)."""
from genrec_fast.data.interactions import (
    build_samples,
    history_suffixes,
    load_interactions,
    sequence_windows,
    user_sequences,
)
from genrec_fast.data.minionerec import DataFormatError, load_catalog, load_minionerec, save_minionerec
from genrec_fast.data.movielens import load_movielens_1m, locate_movielens_1m
from genrec_fast.data.types import Catalog, RecData, Sample

__all__ = [
    "Catalog",
    "DataFormatError",
    "RecData",
    "Sample",
    "build_samples",
    "history_suffixes",
    "load_catalog",
    "load_interactions",
    "load_minionerec",
    "load_movielens_1m",
    "locate_movielens_1m",
    "sequence_windows",
    "user_sequences",
    "save_minionerec",
]
