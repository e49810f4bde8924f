"""Turn a task's raw rows into (source text, class index): templates, label maps, reshaping.

Every task is described by its YAML (conf/task/); the only task code is a named preprocessor for
the two datasets whose rows are not one example each in their official files.
"""

from __future__ import annotations

import string
from typing import Any, Callable, Dict, List

from ptlab.config.schema import TaskConfig
from ptlab.errors import ConfigError


def flatten_multirc(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
    """Official MultiRC jsonl holds one paragraph per line with nested questions and answers;
    make one row per (paragraph, question, answer) as the hub's `super_glue/multirc` does.
    `group` identifies the question, for the exact-match metric."""
    if "passage" not in batch:  # hub rows are flat already
        return {**batch, "group": [f"{i['paragraph']}-{i['question']}" for i in batch["idx"]]}
    rows: Dict[str, List[Any]] = {"paragraph": [], "question": [], "answer": [], "label": [], "group": []}
    for paragraph_idx, passage in zip(batch["idx"], batch["passage"]):
        for question in passage["questions"]:
            for answer in question["answers"]:
                rows["paragraph"].append(passage["text"])
                rows["question"].append(question["question"])
                rows["answer"].append(answer["text"])
                rows["label"].append(int(answer.get("label", -1)))
                rows["group"].append(f"{paragraph_idx}-{question['idx']}")
    return rows


def bin_stsb(batch: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
    """STS-B as text-to-text (T5, Raffel et al. 2020): scores rounded to the nearest 0.2 and
    verbalized as "0.0" ... "5.0" (26 classes); the raw score is kept for Pearson/Spearman."""
    field = "score" if "score" in batch else "label"
    scores = [float(value) for value in batch[field]]
    return {**batch, "label": [round(score * 5) for score in scores], "target_value": scores}


PREPROCESSORS: Dict[str, Callable[[Dict[str, List[Any]]], Dict[str, List[Any]]]] = {
    "multirc": flatten_multirc,
    "stsb": bin_stsb,
}


def preprocessor(task: TaskConfig) -> Callable | None:
    if task.preprocess is None:
        return None
    if task.preprocess not in PREPROCESSORS:
        raise ConfigError(f"task.preprocess={task.preprocess!r} is not one of {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[task.preprocess]


def label_index(task: TaskConfig, raw: Any) -> int:
    """Class index of a raw label: through `label_map`, else the verbalizer it names, else the
    label itself as an index (ints, bools, digit strings)."""
    key = str(raw)
    if key in task.label_map:
        return task.label_map[key]
    if key in task.verbalizers:
        return list(task.verbalizers).index(key)
    if isinstance(raw, bool):
        return int(raw)
    try:
        index = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"task {task.name!r}: label {raw!r} is neither a verbalizer {list(task.verbalizers)} nor in "
            f"task.label_map {dict(task.label_map)}: map it with 'task.label_map={{{key}: INDEX}}'"
        ) from None
    if not 0 <= index < len(task.verbalizers):
        raise ConfigError(
            f"task {task.name!r}: label {raw!r} is not a class of the {len(task.verbalizers)} verbalizers "
            f"{list(task.verbalizers)} (classes 0..{len(task.verbalizers) - 1}): add a verbalizer per class"
        )
    return index


def template_fields(template: str) -> List[str]:
    """The row fields a template fills, in order (`{premise}`...)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_source(task: TaskConfig, row: Dict[str, Any]) -> str:
    """The model input text: the task's template filled with the row's fields."""
    try:
        return task.template.format_map(row)
    except KeyError as error:
        raise ConfigError(
            f"task.template of {task.name!r} uses field {error} but the rows have {sorted(row)}"
        ) from None
