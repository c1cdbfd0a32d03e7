"""The model bundle: what a saved model needs to be used without its data folder.

A model directory (an HF ``save_pretrained`` folder) gets, from :func:`write_bundle`:

* ``genrec_bundle.json``: ``{"format": "genrec_fast.bundle", "version": 1, "prompt_style", "sid_fingerprint",
  "num_items", "codebook_sizes", "item_ids", "titles"}``; titles are in ``item_ids`` order;
* ``sid_index/``: the SID index the model was trained on (``index.json``, ``codes.npy``,
  ``sids_meta.json``: :func:`genrec_fast.sid.index_io.write_index`, the MiniOneRec format).

The fingerprint (:func:`sid_fingerprint`) is the sha256 of the item id -> SID table, sorted by item id
(row order does not change it; a changed id, a changed code or another item set does). A model is tied
to the data it is evaluated on by comparing it with the data's fingerprint (:func:`check_model_matches`).

:func:`write_bundle` is meant for a model directory while it is being assembled in a temp folder (the
folder is published as a whole); its files are written atomically all the same.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from genrec_fast.data.types import Catalog
from genrec_fast.io import atomic_write_text
from genrec_fast.prompts import check_prompt_style
from genrec_fast.sid.index_io import INDEX_FILE, read_index, read_json_object, write_index

BUNDLE_FILE = "genrec_bundle.json"
SID_INDEX_DIR = "sid_index"
BUNDLE_FORMAT = "genrec_fast.bundle"
BUNDLE_VERSION = 1


class BundleMismatchError(ValueError):
    """A model's SID index is not the data's: the model would decode SIDs that name other items."""


@dataclass
class Bundle:
    """A model directory's bundle: the SID index it was trained on, its titles and its prompt style."""

    directory: Path
    prompt_style: str
    sid_fingerprint: str
    item_ids: List[str]
    titles: List[str]
    codes: np.ndarray  # [N, L] int32, row i = item_ids[i]
    codebook_sizes: Tuple[int, ...]

    def catalog(self) -> Catalog:
        """The bundle as a Catalog (``texts`` are the titles: the bundle keeps no other item text)."""
        return Catalog(item_ids=list(self.item_ids), titles=list(self.titles), texts=list(self.titles),
                       codes=self.codes, codebook_sizes=self.codebook_sizes)


def sid_fingerprint(item_ids: Sequence, codes) -> str:
    """sha256 (hex) of the item id -> SID table, rows sorted by item id: ``"id\\tc0,c1,...\\n"`` per item."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != len(item_ids):
        raise ValueError(f"sid_fingerprint: codes must be [{len(item_ids)}, L], got shape {codes.shape}")
    rows = sorted(zip((str(i) for i in item_ids), codes.astype(np.int64).tolist()))
    h = hashlib.sha256(b"genrec_fast.sid_fingerprint.v1\n")
    for item, row in rows:
        h.update(f"{item}\t{','.join(map(str, row))}\n".encode("utf-8"))
    return h.hexdigest()


def catalog_fingerprint(catalog: Catalog) -> str:
    if catalog.codes is None:
        raise ValueError("the catalogue has no Semantic IDs (catalog.codes is None): it has no SID fingerprint")
    return sid_fingerprint(catalog.item_ids, catalog.codes)


def write_bundle(directory: Union[str, Path], catalog: Catalog, prompt_style: str) -> None:
    """Write ``genrec_bundle.json`` and ``sid_index/`` for ``catalog`` (with SIDs) into the model ``directory``."""
    d = Path(directory)
    style = check_prompt_style(prompt_style)
    if catalog.codes is None or catalog.codebook_sizes is None:
        raise ValueError(f"write_bundle({d}): the catalogue has no Semantic IDs (catalog.codes is None)")
    if not d.is_dir():
        raise FileNotFoundError(f"write_bundle: model directory not found: {d}")
    write_index(d / SID_INDEX_DIR, catalog.item_ids, catalog.codes, catalog.codebook_sizes)
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "prompt_style": style,
            "sid_fingerprint": catalog_fingerprint(catalog), "num_items": len(catalog),
            "codebook_sizes": [int(k) for k in catalog.codebook_sizes],
            "item_ids": list(catalog.item_ids), "titles": list(catalog.titles)}
    atomic_write_text(d / BUNDLE_FILE, json.dumps(meta, ensure_ascii=False, indent=1) + "\n")


def has_bundle(model_dir: Union[str, Path]) -> bool:
    return (Path(model_dir) / BUNDLE_FILE).is_file()


def read_bundle(model_dir: Union[str, Path]) -> Bundle:
    """The bundle of a model directory; FileNotFoundError / ValueError naming the file when it is missing,
    malformed, or does not match its own SID index (a checksum mismatch: corrupt or edited)."""
    d = Path(model_dir)
    path = d / BUNDLE_FILE
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model bundle (a model saved before bundles existed, or not by "
                                "genrec-fast); the data folder it was trained on is needed")
    meta = read_json_object(path, "model bundle fields")
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: not a genrec-fast model bundle (format {meta.get('format')!r})")
    if meta.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{path}: bundle version {meta.get('version')!r}; this genrec-fast reads version "
                         f"{BUNDLE_VERSION}")
    for key, kind in (("prompt_style", str), ("sid_fingerprint", str), ("item_ids", list), ("titles", list),
                      ("codebook_sizes", list)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: field {key!r} missing or not a {kind.__name__}")
    sizes = meta["codebook_sizes"]
    if not sizes or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in sizes):
        raise ValueError(f"{path}: field 'codebook_sizes' must be a non-empty list of integers >= 1, got {sizes!r}")
    try:
        style = check_prompt_style(meta["prompt_style"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    item_ids = [str(i) for i in meta["item_ids"]]
    titles = [str(t) for t in meta["titles"]]
    if len(titles) != len(item_ids):
        raise ValueError(f"{path}: {len(item_ids)} item ids but {len(titles)} titles")
    index_path = d / SID_INDEX_DIR / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: missing (the SID index of the bundle {path})")
    try:
        index = read_index(index_path, codebook_sizes=meta["codebook_sizes"])
    except ValueError as e:
        raise ValueError(f"{index_path}: corrupt SID index of the bundle: {e}") from None
    if sorted(index.item_ids) != sorted(item_ids):
        raise ValueError(f"{index_path}: its item ids are not those of {path} (corrupt or mixed bundle)")
    row = {item: i for i, item in enumerate(index.item_ids)}
    codes = index.codes[[row[i] for i in item_ids]] if item_ids else index.codes
    found = sid_fingerprint(item_ids, codes)
    if found != meta["sid_fingerprint"]:
        raise ValueError(f"{path}: SID fingerprint {meta['sid_fingerprint'][:12]}... does not match its SID index "
                         f"{index_path} ({found[:12]}...): corrupt or edited bundle")
    return Bundle(directory=d, prompt_style=style, sid_fingerprint=found, item_ids=item_ids, titles=titles,
                  codes=codes, codebook_sizes=tuple(int(k) for k in meta["codebook_sizes"]))


def check_model_matches(model: Union[str, Path], catalog: Catalog,
                        data: Union[str, Path, None] = None) -> Optional[Bundle]:
    """Refuse a model whose SID index is not the catalogue's: a :class:`BundleMismatchError` naming both paths
    when the model directory's bundle fingerprint differs from ``catalog``'s (read from ``data``). A model
    without a bundle (saved by an older genrec-fast, a hub name) gets a warning and None back."""
    d = Path(model)
    if not has_bundle(d):
        warnings.warn(f"{d} has no {BUNDLE_FILE} (saved by an older genrec-fast?): cannot check that its Semantic "
                      f"IDs are those of {data if data is not None else 'the data'}; a model trained on other SIDs "
                      "gives wrong recommendations silently", stacklevel=2)
        return None
    bundle = read_bundle(d)
    theirs = catalog_fingerprint(catalog)
    if bundle.sid_fingerprint != theirs:
        where = data if data is not None else "the data"
        raise BundleMismatchError(
            f"the model {d} was trained on other Semantic IDs than those of {where}: SID fingerprint "
            f"{bundle.sid_fingerprint[:12]}... in {d / BUNDLE_FILE}, {theirs[:12]}... in {where} "
            f"({len(bundle.item_ids)} vs {len(catalog)} items). Evaluate it on the dataset it was trained on "
            f"(its SID index is kept in {d / SID_INDEX_DIR})")
    return bundle
