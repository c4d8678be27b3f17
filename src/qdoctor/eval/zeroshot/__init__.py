"""Zero-shot multiple-choice evaluation, lm-evaluation-harness compatible, offline.

Eight tasks ship with qdoctor (src/qdoctor/data/tasks/): piqa, arc_easy, arc_challenge,
hellaswag, winogrande, boolq, openbookqa, lambada_openai. Prompts, tokenization and metrics
follow lm-eval 0.4.x (``hf`` model type), so per-item predictions agree with it; scoring shares
each item's prefix across its choices, which makes it several times faster on long questions.
See docs/zeroshot.md.
"""

from qdoctor.eval.zeroshot.data import TaskDataError, choose_indices, find_task_file
from qdoctor.eval.zeroshot.encoding import PairEncoder
from qdoctor.eval.zeroshot.evaluate import ItemResult, TaskResult, evaluate, format_table, load_items, score_items
from qdoctor.eval.zeroshot.scorer import LoglikelihoodScorer
from qdoctor.eval.zeroshot.tasks import DEFAULT_TASKS, TASKS, Item, TaskSpec, get_task, register_task

__all__ = ["evaluate", "format_table", "load_items", "score_items", "TaskResult", "ItemResult", "TaskDataError",
           "TASKS", "DEFAULT_TASKS", "TaskSpec", "Item", "get_task", "register_task", "PairEncoder",
           "LoglikelihoodScorer", "choose_indices", "find_task_file"]
