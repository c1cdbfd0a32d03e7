"""SIDs on the Amazon Industrial release (../shared): the release's own index, and our pipeline
end to end (item.json -> MiniLM -> balanced residual k-means -> index.json) on a subset."""
import json

import numpy as np
import pytest

from genrec_fast import SIDTrie
from genrec_fast.cli import main as cli_main
from genrec_fast.sid import read_index, sid_stats

pytestmark = pytest.mark.shared


def test_release_index_figures(shared_data_dir):
    idx = read_index(shared_data_dir / "index.json", codebook_sizes=(256, 256, 256))
    s = sid_stats(idx.codes, idx.codebook_sizes)
    assert s["num_items"] == 3686
    assert s["collision_groups"] == 15 and s["colliding_items"] == 31
    assert s["used_codes"] == [48, 256, 256]
    assert s["perplexity"][0] < 48


@pytest.mark.slow
def test_pipeline_on_a_subset_is_collision_free(shared_data_dir, tmp_path, capsys):
    items = json.loads((shared_data_dir / "item.json").read_text())
    subset = dict(list(items.items())[:160])
    (tmp_path / "item.json").write_text(json.dumps(subset))
    rc = cli_main(["sids", "--items", str(tmp_path / "item.json"), "--out", str(tmp_path / "sids"),
                   "--codebook", "16", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    idx = read_index(tmp_path / "sids")
    assert idx.item_ids == list(subset)
    s = sid_stats(idx.codes, idx.codebook_sizes)
    assert s["collision_groups"] == 0 and summary["collisions_after"] == 0
    assert s["used_codes"][0] >= 12  # balanced: 160 items over 16 first-level codes, at most 10 each
    assert np.bincount(idx.codes[:, 0]).max() <= 10
    trie = SIDTrie(idx.codes, codebook_sizes=idx.codebook_sizes)
    assert trie.num_items == 160
