"""The zero-shot tasks: one registered ``TaskSpec`` per task, each turning a record into requests.

Prompts, choices, gold labels and the target delimiter reproduce lm-evaluation-harness
0.4.x task configs (``lm_eval/tasks/<lm_eval_config>``), so scores are comparable with
published lm-eval numbers. A multiple-choice item becomes one ``(context, continuation)``
request per choice, continuation = target delimiter (" ") + choice; the prediction is the
choice with the highest log-likelihood of its continuation.

Each task has one record schema (documented in docs/zeroshot.md), which is the field layout
of the Hugging Face dataset lm-eval reads — so the lm-eval YAML itself can be applied to our
files — except HellaSwag (stored after lm-eval's ``process_docs``) and WinoGrande (stored in
lm-eval's partial-scoring form); both also accept the raw Hugging Face layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from qdoctor.errors import QDoctorError

TARGET_DELIMITER = " "  # lm-eval TaskConfig.target_delimiter default; none of our tasks overrides it


class RecordError(ValueError):
    """A record does not fit the task schema (the loader adds file and line)."""


@dataclass(frozen=True)
class Item:
    """One evaluation item as requests: request j is ``(contexts[j], continuations[j])``."""

    index: int  # 0-based position of the record in its file
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings: acc_norm divides by their length
    label: int | None  # gold choice; None for loglikelihood tasks (LAMBADA)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood"
    metrics: tuple[str, ...]  # as the lm-eval config's metric_list (stderr added for each)
    lm_eval_config: str  # relative to lm_eval/tasks/
    schema: str  # one line, for docs and error messages
    build: Callable[[dict, int], Item]


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, kind: str, metrics: tuple[str, ...], lm_eval_config: str, schema: str):
    def decorate(build: Callable[[dict, int], Item]):
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = TaskSpec(name, kind, metrics, lm_eval_config, schema, build)
        return build

    return decorate


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise QDoctorError(f"unknown task {name!r}; available: {', '.join(TASKS)}") from None


# --- record field helpers ---------------------------------------------------------------

def _str(rec: dict, key: str, allow_empty: bool = False) -> str:
    if key not in rec:
        raise RecordError(f"missing field {key!r}")
    value = rec[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _str_list(value, what: str, n: int | None = None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{what} must be a list of strings")
    if n is not None and len(value) != n:
        raise RecordError(f"{what} must have {n} entries, got {len(value)}")
    if len(value) < 2:
        raise RecordError(f"{what} must have at least 2 entries, got {len(value)}")
    for j, v in enumerate(value):
        if not v:  # acc_norm divides by the length of each choice
            raise RecordError(f"{what}[{j}] is empty")
    return value


def _label(rec: dict, key: str, n_choices: int) -> int:
    if key not in rec:
        raise RecordError(f"missing field {key!r}")
    value = rec[key]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_choices:
        raise RecordError(f"field {key!r} must be an integer in 0..{n_choices - 1}, got {rec[key]!r}")
    return value


def _labelled_choices(rec: dict, answer_key: str = "answerKey") -> tuple[list[str], int]:
    """AI2 layout (ARC, OpenBookQA): ``choices = {"text": [...], "label": [...]}`` + ``answerKey``."""
    choices = rec.get("choices")
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise RecordError('field "choices" must be {"text": [...], "label": [...]}')
    texts = _str_list(choices["text"], 'choices["text"]')
    labels = choices["label"]
    if not isinstance(labels, list) or len(labels) != len(texts):
        raise RecordError('choices["label"] must be a list as long as choices["text"]')
    answer = _str(rec, answer_key).lstrip()  # lm-eval OpenBookQA: answerKey.lstrip()
    if answer not in labels:
        raise RecordError(f"{answer_key} {answer!r} is not one of the choice labels {labels}")
    return texts, labels.index(answer)


def _multiple_choice(index: int, context: str, choices: list[str], label: int) -> Item:
    return Item(index, (context,) * len(choices), tuple(TARGET_DELIMITER + c for c in choices), tuple(choices), label)


# --- the eight tasks ----------------------------------------------------------------------

@register_task("piqa", "multiple_choice", ("acc", "acc_norm"), "piqa/piqa.yaml",
               '{"goal": str, "sol1": str, "sol2": str, "label": 0|1}')
def _piqa(rec: dict, index: int) -> Item:
    goal = _str(rec, "goal")
    sols = _str_list([_str(rec, "sol1", allow_empty=True), _str(rec, "sol2", allow_empty=True)], "sol1/sol2")
    return _multiple_choice(index, f"Question: {goal}\nAnswer:", sols, _label(rec, "label", 2))


_ARC_SCHEMA = '{"id": str, "question": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}'


def _arc(rec: dict, index: int) -> Item:
    question = _str(rec, "question")
    texts, label = _labelled_choices(rec)
    return _multiple_choice(index, f"Question: {question}\nAnswer:", texts, label)


register_task("arc_easy", "multiple_choice", ("acc", "acc_norm"), "arc/arc_easy.yaml", _ARC_SCHEMA)(_arc)
register_task("arc_challenge", "multiple_choice", ("acc", "acc_norm"), "arc/arc_challenge.yaml", _ARC_SCHEMA)(_arc)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``tasks/hellaswag/utils.py: preprocess``: strip, " [title]" → ". ", drop WikiHow
    "[...]" markup, collapse one level of double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@register_task("hellaswag", "multiple_choice", ("acc", "acc_norm"), "hellaswag/hellaswag.yaml",
               '{"query": str, "choices": [str x4], "label": 0..3}  (or raw: activity_label, ctx_a, ctx_b, endings, label)')
def _hellaswag(rec: dict, index: int) -> Item:
    if "ctx_a" in rec:  # raw Hugging Face layout: apply lm-eval's process_docs
        ctx = _str(rec, "ctx_a", allow_empty=True) + " " + _str(rec, "ctx_b", allow_empty=True).capitalize()
        query = hellaswag_preprocess(_str(rec, "activity_label") + ": " + ctx)
        endings = rec.get("endings")
        _str_list(endings, '"endings"', n=4)
        choices = [hellaswag_preprocess(e) for e in endings]
    else:
        query = _str(rec, "query")
        choices = rec.get("choices")
    return _multiple_choice(index, query, _str_list(choices, '"choices"', n=4), _label(rec, "label", 4))


@register_task("winogrande", "multiple_choice", ("acc",), "winogrande/default.yaml",
               '{"contexts": [str, str], "continuation": str, "label": 0|1}  (or raw: sentence, option1, option2, answer)')
def _winogrande(rec: dict, index: int) -> Item:
    # Partial scoring (lm-eval "multiple input"): context j = sentence up to the blank with
    # option j filled in; the shared continuation is the rest of the sentence, and only the
    # continuation is scored.
    if "sentence" in rec:
        sentence = _str(rec, "sentence")
        blank = sentence.find("_")
        if blank < 0:
            raise RecordError('field "sentence" has no "_" blank')
        contexts = [sentence[:blank] + _str(rec, "option1"), sentence[:blank] + _str(rec, "option2")]
        continuation = sentence[blank + 1:].strip()
        label = _label(rec, "answer", 3) - 1
        if label < 0:
            raise RecordError('field "answer" must be "1" or "2"')
    else:
        contexts = _str_list(rec.get("contexts"), '"contexts"', n=2)
        continuation = _str(rec, "continuation").strip()
        label = _label(rec, "label", 2)
    if not continuation:
        raise RecordError("the continuation after the blank is empty")
    cont = TARGET_DELIMITER + continuation
    return Item(index, tuple(contexts), (cont, cont), tuple(contexts), label)


@register_task("boolq", "multiple_choice", ("acc",), "super_glue/boolq/default.yaml",
               '{"question": str, "passage": str, "label": 0|1}  (1 = yes)')
def _boolq(rec: dict, index: int) -> Item:
    context = f"{_str(rec, 'passage')}\nQuestion: {_str(rec, 'question')}?\nAnswer:"
    return _multiple_choice(index, context, ["no", "yes"], _label(rec, "label", 2))


@register_task("openbookqa", "multiple_choice", ("acc", "acc_norm"), "openbookqa/openbookqa.yaml",
               '{"id": str, "question_stem": str, "choices": {"text": [str], "label": [str]}, "answerKey": str}')
def _openbookqa(rec: dict, index: int) -> Item:
    texts, label = _labelled_choices(rec)
    return _multiple_choice(index, _str(rec, "question_stem"), texts, label)


@register_task("lambada_openai", "loglikelihood", ("acc", "perplexity"), "lambada/lambada_openai.yaml",
               '{"text": str}  (the target is the last space-separated word)')
def _lambada(rec: dict, index: int) -> Item:
    words = _str(rec, "text").split(" ")
    if len(words) < 2 or not words[-1]:
        raise RecordError('field "text" must end with a word after a space')
    # lm-eval: context = all words but the last joined by " ", target = " " + last word.
    return Item(index, (" ".join(words[:-1]),), (" " + words[-1],), (), None)


DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "openbookqa",
                 "lambada_openai")
