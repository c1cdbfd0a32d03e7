"""The one source of prompt text: the template and the five SFT tasks of the MiniOneRec recipe.

Every prompt is ``TEMPLATE.format(instruction=..., input=...)`` and ends exactly where the
response starts; SFT puts the loss on the response only. ``rec_prompt`` (SID history ->
next SID) is what evaluation, S-DPO and RL feed to the model.

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

from genrec_fast.data.types import Catalog, RecData, Sample
from genrec_fast.sid_tokens import sid_string

TEMPLATE = "### Instruction:\n{instruction}\n### Input:\n{input}\n### Response:\n"


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

    def prompt(self, obj, catalog: Catalog) -> str:
        return TEMPLATE.format(instruction=self.instruction, input=self.make_input(obj, catalog))

    def example(self, obj, catalog: Catalog) -> Example:
        return Example(self.name, self.prompt(obj, catalog), self.make_response(obj, catalog))


def _sid(catalog: Catalog, i: int) -> str:
    if catalog.codes is None:
        raise ValueError("this task needs SIDs, but the catalogue has none (catalog.codes is None)")
    return sid_string(catalog.codes[i])


def _sid_history(s: Sample, c: Catalog) -> str:
    return " ".join(_sid(c, i) for i in s.history)


def _title_history(s: Sample, c: Catalog) -> str:
    return "\n".join(f'"{c.titles[i]}"' for i in s.history)


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("sid_seq", "samples", "Recommend the next item after these, oldest first.",
             _sid_history, lambda s, c: _sid(c, s.target)),
        Task("sid2title", "items", "Name this item.",
             lambda i, c: _sid(c, i), lambda i, c: c.titles[i]),
        Task("title2sid", "items", "Which item has this title?",
             lambda i, c: f'"{c.titles[i]}"', lambda i, c: _sid(c, i)),
        Task("sid_seq2title", "samples", "Name the next item after these, oldest first.",
             _sid_history, lambda s, c: c.titles[s.target]),
        Task("title_seq2sid", "samples", "Recommend the next item after these titles, oldest first.",
             _title_history, lambda s, c: _sid(c, s.target)),
    )
}
DEFAULT_TASKS = tuple(TASKS)


def rec_prompt(history: Sequence[int], catalog: Catalog) -> str:
    """Prompt for SID history -> next SID (items are catalogue indices, oldest first)."""
    return TASKS["sid_seq"].prompt(Sample(user_id="", history=list(history), target=-1), catalog)


def check_tasks(tasks: Iterable[str]) -> List[str]:
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown SFT task(s) {unknown}; known: {list(TASKS)}")
    if not tasks:
        raise ValueError("at least one SFT task must be on")
    return tasks


def build_examples(data: RecData, tasks: Iterable[str] = DEFAULT_TASKS, split: str = "train",
                   samples: Optional[Sequence[Sample]] = None) -> List[Example]:
    """All examples of the enabled tasks: sample tasks over ``split`` (or ``samples``), item tasks over the catalogue."""
    rows = list(getattr(data, split) if samples is None else samples)
    out: List[Example] = []
    for name in check_tasks(tasks):
        task = TASKS[name]
        objs = range(len(data.catalog)) if task.source == "items" else rows
        out.extend(task.example(o, data.catalog) for o in objs)
    return out


def tokenizer_corpus(catalog: Catalog, template_weight: int = 200) -> List[str]:
    """Text to train the tiny preset's tokenizer on: the titles, and every task's template text
    (repeated ``template_weight`` times so its words become single tokens)."""
    fixed = [TEMPLATE.format(instruction=t.instruction, input="") for t in TASKS.values()]
    return list(catalog.titles) + fixed * template_weight
