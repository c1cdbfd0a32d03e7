"""The task registry and the one template source."""
import numpy as np
import pytest

import genrec_fast.prompts as P
from genrec_fast.data import Catalog, RecData, Sample, history_suffixes, sequence_windows, user_sequences
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
    tags = [t.tag for t in P.TASKS.values() if t.tag]
    assert corpus[:3] == ["Hammer", "Nails", "Saw"] and len(corpus) == 3 + 3 * (len(P.TASKS) + len(tags))


def test_parse_sid_accepts_only_the_spelling_of_the_token_block():
    assert parse_sid("<a_0><b_12>") == [0, 12] and parse_sid(["<a_10>", "<b_3>"]) == [10, 3]
    for bad in ("<a_01><b_2>", "<b_1><a_2>", "<a_1>x", "<a_-1>"):
        with pytest.raises(ValueError):
            parse_sid(bad)


def test_short_style_is_the_template_without_its_instruction_line(data):
    s = data.train[1]
    assert P.rec_prompt([0, 1], data.catalog, "short") == "### Input:\n<a_1><b_2> <a_1><b_3>\n### Response:\n"
    for task in P.TASKS.values():  # every task: the same input and response as the MiniOneRec template, its tag
        obj = s if task.source == "samples" else 2
        full, short = task.example(obj, data.catalog), task.example(obj, data.catalog, "short")
        assert short.response == full.response and task.instruction not in short.prompt
        assert short.prompt == "### Input:\n" + task.tag + full.prompt.split("### Input:\n", 1)[1]
    tags = [t.tag for t in P.TASKS.values()]
    assert len(set(tags)) == len(tags)  # the tasks stay apart without their instructions
    with pytest.raises(ValueError, match="needs the compact prompt style"):
        P.build_examples(data, ["sid_seq"], style="short", sequence_loss=True)  # the sequence loss is compact's


def test_compact_style_is_the_bare_item_sequence(data):
    s = data.train[1]
    assert P.rec_prompt([0, 1], data.catalog, "compact") == "<a_1><b_2><a_1><b_3>"
    ex = P.TASKS["sid_seq"].example(s, data.catalog, "compact")
    assert ex.prompt + ex.response == "<a_1><b_2><a_1><b_3><a_0><b_3>"  # prompt + response: the sequence
    for task in P.TASKS.values():  # the other tasks keep a short tag and no instruction text
        obj = s if task.source == "samples" else 2
        prompt = task.prompt(obj, data.catalog, "compact")
        assert "###" not in prompt and task.instruction not in prompt and prompt.startswith(task.tag)
    # no style given: the MiniOneRec template, for prompts and examples alike
    assert P.rec_prompt([0, 1], data.catalog).startswith("### Instruction:")
    assert P.rec_prompt([0, 1], data.catalog, "compact") == "<a_1><b_2><a_1><b_3>"
    examples = P.build_examples(data, ["sid_seq"], style="compact")
    assert [e.prompt for e in examples] == ["<a_1><b_2>", "<a_1><b_2><a_1><b_3>"]
    with pytest.raises(ValueError, match="unknown prompt style"):
        P.rec_prompt([0], data.catalog, "chat")
    assert "next sid:" in P.tokenizer_corpus(data.catalog, template_weight=1)


def test_sequence_loss_examples_cover_every_history_item(data):
    ex = P.build_examples(data, ["sid_seq", "title2sid"], style="compact", sequence_loss=True)
    seq = [e for e in ex if e.task == "sid_seq"]
    # prompt = the first history item; response = the rest of the history + the target
    assert [(e.prompt, e.response) for e in seq] == [("<a_1><b_2>", "<a_1><b_3>"),
                                                      ("<a_1><b_2>", "<a_1><b_3><a_0><b_3>")]
    full = P.build_examples(data, ["sid_seq"], style="compact")
    assert [e.prompt + e.response for e in seq] == [e.prompt + e.response for e in full]
    assert len([e for e in ex if e.task == "title2sid"]) == 3  # other tasks unchanged
    with pytest.raises(ValueError, match="compact"):
        P.build_examples(data, ["sid_seq"], style="minionerec", sequence_loss=True)


def test_sequence_windows_train_every_transition_once_with_a_bounded_past():
    q = list(range(8))
    assert sequence_windows(q, 3) == [[5, 6, 7], [3, 4, 5], [1, 2, 3], [0, 1]]
    assert sequence_windows(q, 4, stride=1)[:2] == [[4, 5, 6, 7], [3, 4, 5, 6]]
    assert sequence_windows([5], 3) == [] and sequence_windows([], 3) == []
    for bad, match in (((q, 1), "max_len must be >= 2"), ((q, 3, 3), r"stride must be in 1..max_len - 1 = 2")):
        with pytest.raises(ValueError, match=match):
            sequence_windows(*bad)

    cat = Catalog([str(i) for i in range(8)], [f"t{i}" for i in range(8)], [""] * 8,
                  codes=np.array([[0, i] for i in range(8)]), codebook_sizes=(1, 8))
    train = [Sample("u", list(range(max(0, t - 5), t)), t) for t in range(1, 8)]
    data = RecData(cat, train, [], [])
    whole = P.build_examples(data, ["sid_seq"], style="compact", sequence_loss=True, whole_sequences=True)
    win = P.build_examples(data, ["sid_seq"], style="compact", sequence_loss=True, whole_sequences=True,
                           sequence_window=3)
    assert len(whole) == 1 and whole[0].prompt == "<a_0><b_0>"
    # oldest window first; each one's first item is its prompt, so each transition 1..7 is a target once
    assert [(e.prompt, e.response) for e in win] == [("<a_0><b_0>", "<a_0><b_1>"),
                                                     ("<a_0><b_1>", "<a_0><b_2><a_0><b_3>"),
                                                     ("<a_0><b_3>", "<a_0><b_4><a_0><b_5>"),
                                                     ("<a_0><b_5>", "<a_0><b_6><a_0><b_7>")]
    for kw, match in ((dict(whole_sequences=False, sequence_window=3), "needs whole_sequences"),
                      (dict(whole_sequences=True, sequence_window=1), "at least 2 items")):
        with pytest.raises(ValueError, match=match):
            P.build_examples(data, ["sid_seq"], style="compact", sequence_loss=True, **kw)


def test_user_sequences_and_model_prompt_style():
    train = [Sample("u", [0], 1), Sample("u", [0, 1], 2), Sample("u", [1, 2], 3), Sample("w", [4], 5),
             Sample("u", [7], 8)]  # the last one does not continue u's sequence: a new one, nothing made up
    assert user_sequences(train) == [[0, 1, 2, 3], [4, 5], [7, 8]]

    class _Cfg:
        prompt_style = "compact"

    class _Model:
        config = _Cfg()

    assert P.model_prompt_style(_Model()) == "compact"

    class _Peft:  # a PEFT wrapper: the base model's config
        def get_base_model(self):
            return _Model()

    assert P.model_prompt_style(_Peft()) == "compact"
    _Cfg.prompt_style = None  # a model saved before prompt styles: the MiniOneRec template
    assert P.model_prompt_style(_Model()) == "minionerec"
    _Cfg.prompt_style = "chat"
    with pytest.raises(ValueError, match="unknown prompt style 'chat'"):
        P.model_prompt_style(_Model())


def test_history_suffixes_copy_each_sample_with_its_last_k_items():
    rows = [Sample("u", [1, 2, 3], 4), Sample("v", [7], 8), Sample("w", [5, 6], 9)]
    got = history_suffixes(rows, [1, 2])
    # K = 1 first, then K = 2, each in the samples' order; a history of <= K items is not copied
    assert [(s.user_id, s.history, s.target) for s in got] == [("u", [3], 4), ("w", [6], 9), ("u", [2, 3], 4)]
    assert history_suffixes(rows, []) == []
    assert rows[0].history == [1, 2, 3]  # the originals are left as they are
    for bad in ([0], [2, 2], [-1]):
        with pytest.raises(ValueError, match="distinct integers >= 1"):
            history_suffixes(rows, bad)

