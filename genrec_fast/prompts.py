"""The one source of prompt text: the template and the five SFT tasks of the MiniOneRec recipe.

Every prompt is ``TEMPLATE.format(instruction=..., input=...)`` (prompt style ``"minionerec"``, the
default: the MiniOneRec format, for pretrained LLMs) or ``COMPACT_TEMPLATE.format(tag=..., input=...)``
(style ``"compact"``, for a small model trained from scratch: no fixed instruction text; the
recommendation prompt is the history's SIDs alone, so prompt + response is the item sequence) or
``SHORT_TEMPLATE.format(tag=..., input=...)`` (style ``"short"``: the MiniOneRec template without its
instruction line, the compact style's task tag before the input) and ends exactly where the response
starts; SFT puts the loss on the response. ``rec_prompt`` (SID history -> next SID) is what evaluation,
S-DPO and RL feed to the model, in the style the model was trained with (:func:`model_prompt_style`: SFT
writes it into the model's config).

Tasks (name: input -> response):
  ``sid_seq``        SID history -> next item's SID (the recommendation task)
  ``sid2title``      an item's SID -> its title
  ``title2sid``      an item's title -> its SID
  ``sid_seq2title``  SID history -> next item's title
  ``title_seq2sid``  title history -> next item's SID
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from genrec_fast.data.interactions import sequence_windows, user_sequences
from genrec_fast.data.types import Catalog, RecData, Sample
from genrec_fast.sid_tokens import sid_string

TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"
# compact: a short task tag (empty for sid_seq) and the input; the response follows at once
COMPACT_TEMPLATE = "{tag}{input}"
# short: the template's delimiters without the instruction line (the task tag marks the task)
SHORT_TEMPLATE = "### Input:\n{tag}{input}\n### Response:\n"
PROMPT_STYLES = ("minionerec", "compact", "short")
DEFAULT_STYLE = "minionerec"


def check_prompt_style(style: Optional[str]) -> str:
    """``style`` checked (None: the default, "minionerec")."""
    style = DEFAULT_STYLE if style is None else style
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; known: {list(PROMPT_STYLES)}")
    return style


def model_prompt_style(model) -> str:
    """The prompt style a model was trained with: ``config.prompt_style`` (written by SFT; through a PEFT
    wrapper too), "minionerec" for a model without it (a MiniOneRec checkpoint, any HF model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return check_prompt_style(getattr(getattr(base, "config", None), "prompt_style", None))


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    response: str


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # "samples" (one example per history sample) or "items" (one per catalogue item)
    instruction: str
    make_input: Callable  # (sample | item index, catalog) -> input text
    make_response: Callable  # (sample | item index, catalog) -> response text
    tag: str = ""  # the compact style's task marker (sid_seq: none)
    compact_input: Optional[Callable] = None  # the compact style's input text (default: make_input)

    def prompt(self, obj, catalog: Catalog, style: Optional[str] = None) -> str:
        style = check_prompt_style(style)
        if style == "compact":
            return COMPACT_TEMPLATE.format(tag=self.tag, input=(self.compact_input or self.make_input)(obj, catalog))
        if style == "short":
            return SHORT_TEMPLATE.format(tag=self.tag, input=self.make_input(obj, catalog))
        return TEMPLATE.format(instruction=self.instruction, input=self.make_input(obj, catalog))

    def example(self, obj, catalog: Catalog, style: Optional[str] = None) -> Example:
        return Example(self.name, self.prompt(obj, catalog, style), self.make_response(obj, catalog))


def _sid(catalog: Catalog, i: int) -> str:
    if catalog.codes is None:
        raise ValueError("this task needs SIDs, but the catalogue has none (catalog.codes is None)")
    return sid_string(catalog.codes[i])


def _sid_history(s: Sample, c: Catalog) -> str:
    return " ".join(_sid(c, i) for i in s.history)


def _sid_sequence(s: Sample, c: Catalog) -> str:
    """The compact history: SIDs back to back (their tokens delimit them), as the response continues it."""
    return "".join(_sid(c, i) for i in s.history)


def _title_history(s: Sample, c: Catalog) -> str:
    return "\n".join(f'"{c.titles[i]}"' for i in s.history)


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("sid_seq", "samples", "Recommend the next item after these, oldest first.",
             _sid_history, lambda s, c: _sid(c, s.target), "", _sid_sequence),
        Task("sid2title", "items", "Name this item.",
             lambda i, c: _sid(c, i), lambda i, c: c.titles[i], "name:"),
        Task("title2sid", "items", "Which item has this title?",
             lambda i, c: f'"{c.titles[i]}"', lambda i, c: _sid(c, i), "sid:"),
        Task("sid_seq2title", "samples", "Name the next item after these, oldest first.",
             _sid_history, lambda s, c: c.titles[s.target], "next name:", _sid_sequence),
        Task("title_seq2sid", "samples", "Recommend the next item after these titles, oldest first.",
             _title_history, lambda s, c: _sid(c, s.target), "next sid:"),
    )
}
DEFAULT_TASKS = tuple(TASKS)


def rec_prompt(history: Sequence[int], catalog: Catalog, style: Optional[str] = None) -> str:
    """Prompt for SID history -> next SID (items are catalogue indices, oldest first); ``style`` None:
    "minionerec" (pass :func:`model_prompt_style` of the model that reads it)."""
    return TASKS["sid_seq"].prompt(Sample(user_id="", history=list(history), target=-1), catalog, style)


def check_tasks(tasks: Iterable[str]) -> List[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown SFT task(s) {unknown}; known: {list(TASKS)}")
    if not tasks:
        raise ValueError("at least one SFT task must be on")
    return tasks


def build_examples(data: RecData, tasks: Iterable[str] = DEFAULT_TASKS, split: str = "train",
                   samples: Optional[Sequence[Sample]] = None, style: Optional[str] = None,
                   sequence_loss: bool = False, whole_sequences: bool = False,
                   sequence_window: int = 0) -> List[Example]:
    """All examples of the enabled tasks: sample tasks over ``split`` (or ``samples``), item tasks over the catalogue.

    ``sequence_loss`` (compact style only): a ``sid_seq`` example's prompt is its first history item and
    its response the rest of the history + the target, so SFT's response loss trains every history item
    as the next item of the items before it (as SASRec does); the rec prompt + target is the same token
    sequence either way. ``whole_sequences`` (with ``sequence_loss``): one ``sid_seq`` example per user
    sequence (:func:`genrec_fast.data.user_sequences`) instead of one per window: every transition once, each with its
    whole past, in a fraction of the tokens of the overlapping windows. ``sequence_window`` N > 0 (with
    ``whole_sequences``): each user sequence is cut into windows of <= N items, as SASRec trains
    (:func:`genrec_fast.data.sequence_windows`: consecutive windows share one item, so every transition is
    still trained once, with at most N - 1 items before it, as a prompt of N - 1 history items has).
    """
    style = check_prompt_style(style)
    if sequence_loss and style != "compact":
        raise ValueError("sequence_loss needs the compact prompt style (the history is then the item sequence)")
    if whole_sequences and not sequence_loss:
        raise ValueError("whole_sequences needs sequence_loss (a user sequence has a loss on every item)")
    if sequence_window and (not whole_sequences or sequence_window < 2):
        raise ValueError(f"sequence_window={sequence_window}: needs whole_sequences and at least 2 items per window")
    rows = list(getattr(data, split) if samples is None else samples)
    out: List[Example] = []
    for name in check_tasks(tasks):
        task = TASKS[name]
        if name == "sid_seq" and sequence_loss and whole_sequences:
            c = data.catalog
            seqs = user_sequences(rows)
            if sequence_window:
                seqs = [w for q in seqs for w in reversed(sequence_windows(q, sequence_window))]
            out.extend(Example(name, _sid(c, q[0]), "".join(_sid(c, i) for i in q[1:]))
                       for q in seqs if len(q) > 1)
            continue
        if name == "sid_seq" and sequence_loss:
            c = data.catalog
            out.extend(Example(name, _sid(c, s.history[0]),
                               "".join(_sid(c, i) for i in list(s.history[1:]) + [s.target]))
                       if len(s.history) else task.example(s, c, style) for s in rows)
            continue
        objs = range(len(data.catalog)) if task.source == "items" else rows
        out.extend(task.example(o, data.catalog, style) for o in objs)
    return out


def tokenizer_corpus(catalog: Catalog, template_weight: int = 200) -> List[str]:
    """Text to train the tiny preset's tokenizer on: the titles, and every task's template text
    (repeated ``template_weight`` times so its words become single tokens)."""
    fixed = [TEMPLATE.format(instruction=t.instruction, input="") for t in TASKS.values()]
    fixed += [t.tag for t in TASKS.values() if t.tag]
    return list(catalog.titles) + fixed * template_weight
