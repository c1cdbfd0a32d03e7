"""embed_items: the bundled all-MiniLM-L6-v2, the AutoModel mean-pooling path, the on-disk cache."""
import os

import numpy as np
import pytest

from genrec_fast.sid import embed
from genrec_fast.sid.embed import cache_key, default_encoder_path, embed_items

TEXTS = ["Stanley staples, 1/2 inch, 1000 count", "Hot glue sticks for crafts", "Stanley staples, 1/2 inch, 1000 count",
         "A cordless drill with two batteries"]


@pytest.fixture(scope="module")
def st_embeddings(tmp_path_factory):
    return embed_items(TEXTS, cache_dir=tmp_path_factory.mktemp("cache"), progress=False, device="cpu")


def test_default_encoder_embeds_and_normalises(st_embeddings):
    e = st_embeddings
    assert e.shape == (4, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.allclose(e[0], e[2], atol=1e-6)
    # related texts are closer than unrelated ones
    assert e[0] @ e[2] > e[0] @ e[1] and e[0] @ e[2] > e[0] @ e[3]


def test_automodel_mean_pooling_matches_sentence_transformers(tmp_path, st_embeddings):
    # the same weights without modules.json go through transformers.AutoModel + masked mean pooling
    src = default_encoder_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        os.symlink(src / name, tmp_path / name)
    e = embed_items(TEXTS, encoder=str(tmp_path), use_cache=False, progress=False, device="cpu", batch_size=3)
    assert np.allclose(e, st_embeddings, atol=1e-5)


def test_cache_hit_skips_the_encoder(tmp_path, monkeypatch):
    texts = ["one item", "another item"]
    first = embed_items(texts, cache_dir=tmp_path, progress=False, device="cpu")
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{cache_key(texts, embed._resolve_encoder(None)[1], 256)}.npy"]

    def boom(*a, **k):
        raise AssertionError("encoder called despite a cached result")

    monkeypatch.setattr(embed, "_encode", boom)
    assert np.array_equal(embed_items(texts, cache_dir=tmp_path, progress=False), first)
    # a different text list (or order) is a different key
    assert cache_key(texts[::-1], embed.DEFAULT_ENCODER, 256) != cache_key(texts, embed.DEFAULT_ENCODER, 256)
    assert cache_key(texts, "path:/x", 256) != cache_key(texts, embed.DEFAULT_ENCODER, 256)
    with pytest.raises(AssertionError, match="encoder called"):
        embed_items(texts[::-1], cache_dir=tmp_path, progress=False)


def test_cache_key_follows_the_encoder_files(tmp_path, tiny_encoder, monkeypatch):
    """A model folder re-written in place (retrained, upgraded) is a new cache key, not a stale hit."""
    import shutil

    enc = tmp_path / "enc"
    shutil.copytree(tiny_encoder, enc)
    calls = []
    real = embed._encode

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(embed, "_encode", counting)
    texts = ["one item", "another item"]
    first = embed_items(texts, encoder=str(enc), cache_dir=tmp_path / "c", progress=False, device="cpu")
    embed_items(texts, encoder=str(enc), cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert len(calls) == 1  # the second call was a cache hit
    from transformers import BertModel

    model = BertModel.from_pretrained(enc)
    import torch

    with torch.no_grad():
        w = model.embeddings.word_embeddings.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(enc)  # same folder, new weights
    again = embed_items(texts, encoder=str(enc), cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert len(calls) == 2 and not np.allclose(again, first)

    # new weights of the same size copied in with the old mtime (cp -p, rsync -a, tar x): still a new key
    import os

    weights = next(p for p in enc.iterdir() if p.suffix == ".safetensors")
    st = weights.stat()
    with torch.no_grad():
        w.mul_(0.5)
    model.save_pretrained(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / weights.name, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    third = embed_items(texts, encoder=str(enc), cache_dir=tmp_path / "c", progress=False, device="cpu")
    assert len(calls) == 3 and not np.allclose(third, again)


def test_a_hub_name_that_is_not_on_disk_is_not_cached(monkeypatch):
    """A bare hub name says nothing of which revision made the vectors: no cache key, so no stale hit."""
    name = "some-org/not-downloaded-encoder-xyz"
    assert embed._resolve_encoder(name) == (name, None)


def test_bad_texts():
    with pytest.raises(ValueError, match="no texts"):
        embed_items([], use_cache=False)
    with pytest.raises(TypeError, match="texts\\[1\\]"):
        embed_items(["ok", 3], use_cache=False)
