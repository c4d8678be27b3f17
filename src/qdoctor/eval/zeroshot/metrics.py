"""Per-item predictions and aggregate metrics, with lm-eval's definitions.

- ``acc``: the choice with the highest continuation log-likelihood is the gold one
  (ties → the first, as ``numpy.argmax``).
- ``acc_norm``: the same after dividing each log-likelihood by the length of the choice
  string in characters — lm-eval's ``acc_norm`` (``len(choice)``, without the delimiter).
- ``acc_bytes``: divided by the UTF-8 byte length instead (lm-eval's ``acc_bytes``; equals
  ``acc_norm`` when every choice is ASCII).
- LAMBADA: ``acc`` = every target token is the greedy argmax; ``perplexity`` =
  exp(−mean per-item log-likelihood), as lm-eval's ``perplexity`` aggregation.
- stderr of a mean: sample standard deviation (n − 1) / √n (lm-eval ``mean_stderr``).
  For perplexity lm-eval bootstraps; we give the delta-method value ppl · stderr(loglik).
"""

from __future__ import annotations

import math


def argmax(values: list[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def normalized(loglikelihoods: list[float], lengths: list[int]) -> list[float]:
    return [ll / n for ll, n in zip(loglikelihoods, lengths)]
