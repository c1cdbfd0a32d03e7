"""The task registry and the one template source."""
import numpy as np
import pytest

import genrec_fast.prompts as P
from genrec_fast.data import Catalog, RecData, Sample
from genrec_fast.sid_tokens import parse_sid


@pytest.fixture
def data():
    cat = Catalog(["10", "11", "12"], ["Hammer", "Nails", "Saw"], ["Hammer", "Nails", "Saw"],
                  codes=np.array([[1, 2], [1, 3], [0, 3]]), codebook_sizes=(4, 4))
    train = [Sample("u", [0], 1), Sample("u", [0, 1], 2)]
    return RecData(cat, train, [Sample("v", [2], 0)], [])


def test_five_tasks_from_one_template(data):
    assert set(P.TASKS) == {"sid_seq", "sid2title", "title2sid", "sid_seq2title", "title_seq2sid"}
    head, tail = P.TEMPLATE.split("{instruction}")[0], P.TEMPLATE.split("{input}")[1]
    for name, task in P.TASKS.items():
        objs = range(3) if task.source == "items" else data.train
        for ex in (task.example(o, data.catalog) for o in objs):
            assert ex.task == name
            assert ex.prompt.startswith(head) and ex.prompt.endswith(tail) and task.instruction in ex.prompt
    s = data.train[1]
    ex = {n: t.example(s if t.source == "samples" else 2, data.catalog) for n, t in P.TASKS.items()}
    assert ex["sid_seq"].response == "<a_0><b_3>" and "<a_1><b_2> <a_1><b_3>" in ex["sid_seq"].prompt
    assert ex["sid_seq2title"].response == "Saw"
    assert ex["title_seq2sid"].response == "<a_0><b_3>" and '"Hammer"\n"Nails"' in ex["title_seq2sid"].prompt
    assert ex["sid2title"].response == "Saw" and "<a_0><b_3>" in ex["sid2title"].prompt
    assert ex["title2sid"].response == "<a_0><b_3>" and '"Saw"' in ex["title2sid"].prompt
    assert parse_sid(ex["title2sid"].response) == [0, 3]


def test_rec_prompt_is_the_sid_seq_prompt(data):
    p = P.rec_prompt([0, 1], data.catalog)
    assert p == P.TASKS["sid_seq"].prompt(data.train[1], data.catalog)
    assert p.endswith("### Response:\n")


def test_build_examples_respects_task_switches(data):
    ex = P.build_examples(data, ["sid_seq", "title2sid"])
    assert [e.task for e in ex] == ["sid_seq"] * 2 + ["title2sid"] * 3
    assert len(P.build_examples(data)) == 3 * 2 + 2 * 3
    assert [e.response for e in P.build_examples(data, ["sid_seq"], split="valid")] == ["<a_1><b_2>"]
    with pytest.raises(ValueError, match="unknown SFT task"):
        P.build_examples(data, ["sid_seq", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        P.build_examples(data, [])
    no_sids = RecData(Catalog(["a", "b"], ["A", "B"], ["A", "B"]), [Sample("u", [0], 1)], [], [])
    with pytest.raises(ValueError, match="needs SIDs"):
        P.build_examples(no_sids, ["sid_seq"])


def test_tokenizer_corpus_holds_titles_and_template(data):
    corpus = P.tokenizer_corpus(data.catalog, template_weight=3)
    assert corpus[:3] == ["Hammer", "Nails", "Saw"] and len(corpus) == 3 + 3 * len(P.TASKS)


def test_parse_sid_accepts_only_the_spelling_of_the_token_block():
    assert parse_sid("<a_0><b_12>") == [0, 12] and parse_sid(["<a_10>", "<b_3>"]) == [10, 3]
    for bad in ("<a_01><b_2>", "<b_1><a_2>", "<a_1>x", "<a_-1>"):
        with pytest.raises(ValueError):
            parse_sid(bad)
