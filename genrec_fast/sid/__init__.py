"""Item Semantic IDs: text embeddings -> residual k-means or RQ-VAE -> collision-free SIDs.

Python API::

    from genrec_fast.sid import build_sids, write_index, read_index
    res = build_sids(texts_or_embeddings, method="rqkmeans", levels=3, codebook_size=256, seed=0)
    write_index("out/", item_ids, res.codes, res.codebook_sizes, res.report)
    idx = read_index("out/")          # -> SIDIndex(item_ids, codes [N, L] int32, codebook_sizes)
    trie = SIDTrie(idx.codes, codebook_sizes=idx.codebook_sizes)

CLI: ``genrec-fast sids --items item.json --out DIR [--method rqvae|rqkmeans] [--levels 3] [--codebook 256]``.
"""
from genrec_fast.sid.build import METHODS, SIDResult, build_sids
from genrec_fast.sid.collisions import collision_groups, make_unique, sid_stats
from genrec_fast.sid.embed import DEFAULT_ENCODER, embed_items, read_item_json
from genrec_fast.sid.index_io import SIDIndex, read_index, write_index
from genrec_fast.sid.kmeans import ResidualKMeans, kmeans
from genrec_fast.sid.rqvae import RQVAE, train_rqvae

__all__ = [
    "DEFAULT_ENCODER",
    "METHODS",
    "RQVAE",
    "ResidualKMeans",
    "SIDIndex",
    "SIDResult",
    "build_sids",
    "collision_groups",
    "embed_items",
    "kmeans",
    "make_unique",
    "read_index",
    "read_item_json",
    "sid_stats",
    "train_rqvae",
    "write_index",
]
