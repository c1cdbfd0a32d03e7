"""Hand-computed checks of the rewards and group advantages."""
import math

import numpy as np
import pytest
import torch

from genrec_fast.train.rewards import (
    SemanticReward,
    TransitionBonusReward,
    group_advantages,
    group_rewards,
    hit_rank,
    make_reward,
    no_signal_share,
    ranking_reward,
    rule_reward,
)


def _beams(*lists):
    return [np.asarray(x, dtype=np.int64) for x in lists]


def test_ranking_reward_hand_computed():
    w = [1.0, 1 / math.log2(3), 0.5, 1 / math.log2(5)]
    s = sum(w)
    got = ranking_reward(2, 4)
    expected = [-w[0] / s, -w[1] / s, 1.0, -w[3] / s]
    torch.testing.assert_close(got, torch.tensor(expected))
    # hit at rank 0: the wrong beams are penalised by their own rank
    torch.testing.assert_close(ranking_reward(0, 4), torch.tensor([1.0, -w[1] / s, -w[2] / s, -w[3] / s]))
    assert ranking_reward(None, 4).tolist() == [0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="hit_rank 4"):
        ranking_reward(4, 4)


def test_rule_reward_and_hit_rank_with_shared_sids():
    beams = _beams([3], [5, 9], [1])  # beam 1's SID is shared by items 5 and 9
    assert rule_reward(beams, 9).tolist() == [0.0, 1.0, 0.0]
    assert rule_reward(beams, 4).tolist() == [0.0, 0.0, 0.0]
    assert hit_rank(beams, 9) == 1 and hit_rank(beams, 4) is None


def test_group_rewards_by_name():
    beams = [_beams([0], [1], [2]), _beams([4], [5], [6])]
    r = group_rewards(make_reward("ranking"), beams, [1, 7])
    assert r.shape == (2, 3)
    torch.testing.assert_close(r[0], ranking_reward(1, 3))
    assert r[1].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown reward"):
        make_reward("nope")
    with pytest.raises(ValueError, match="2 groups of beams but 1 targets"):
        group_rewards(rule_reward, beams, [1])


def test_transition_bonus_reward_hand_computed():
    from genrec_fast.data.types import Sample
    from genrec_fast.eval.baselines import TransitionTable

    # last item 0 was followed by 2 three times and by 3 once; item 1 by 4 once
    fit = [Sample("a", [0], 2)] * 3 + [Sample("b", [5, 0], 3), Sample("c", [1], 4)]
    fn = make_reward("ranking+transition", transitions=TransitionTable(fit, 6), transition_weight=0.5)
    assert isinstance(fn, TransitionBonusReward) and fn.needs_history
    beams = _beams([3], [1, 2], [4])  # beam 1's SID is shared by items 1 and 2: the larger count (3) counts
    got = fn(beams, 4, [5, 0])  # the target 4 at rank 2
    torch.testing.assert_close(got, ranking_reward(2, 3) + 0.5 * torch.log1p(torch.tensor([1.0, 3.0, 0.0])))
    # a miss: no ranking signal, the counts still tell the beams apart
    torch.testing.assert_close(fn(beams, 5, [0]), 0.5 * torch.log1p(torch.tensor([1.0, 3.0, 0.0])))
    assert fn(beams, 5, []).tolist() == [0.0, 0.0, 0.0]  # no history: no counts
    # through group_rewards, which passes each group's history, and refuses to run without them
    r = group_rewards(fn, [beams, beams], [4, 5], [[0], [1]])
    torch.testing.assert_close(r[1], 0.5 * torch.log1p(torch.tensor([0.0, 0.0, 1.0])))
    with pytest.raises(ValueError, match="needs each group's history: got none for 2 groups"):
        group_rewards(fn, [beams, beams], [4, 5])
    with pytest.raises(ValueError, match="needs a transition table"):
        make_reward("ranking+transition")
    with pytest.raises(ValueError, match="transition reward weight must be a finite number >= 0"):
        make_reward("ranking+transition", transitions=TransitionTable(fit, 6), transition_weight=-1.0)


def test_semantic_reward():
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]])
    fn = make_reward("semantic", emb)
    got = fn(_beams([0], [1, 2], [3]), 2)
    torch.testing.assert_close(got, torch.tensor([1 / math.sqrt(2), 1.0, -1 / math.sqrt(2)]))
    with pytest.raises(ValueError, match="needs item_embeddings"):
        make_reward("semantic")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        SemanticReward(np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(r)
    std = math.sqrt(((0.75**2) + 3 * 0.25**2) / 3)  # unbiased
    expected0 = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3
    torch.testing.assert_close(adv[0], torch.tensor(expected0))
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert no_signal_share(r) == 0.5
    with pytest.raises(ValueError, match="B >= 2"):
        group_advantages(torch.ones(3, 1))
