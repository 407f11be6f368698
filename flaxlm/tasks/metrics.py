"""Per-document results -> task metrics, defined as lm-evaluation-harness defines them.

- multiple choice: ``acc`` (the highest log-likelihood is the gold choice), ``acc_norm`` (the
  same after dividing each log-likelihood by its choice's length in characters);
- ``loglikelihood``: ``acc`` (the continuation is the greedy one), ``perplexity``
  (``exp(-mean log p)``);
- rolling log-likelihood: ``word_perplexity`` / ``byte_perplexity`` (``exp(-sum log p / sum
  words or bytes)``, words split on whitespace) and ``bits_per_byte``;
- ``generate_until``: ``exact_match`` (after the metric's ``regexes_to_ignore``, then
  ``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``).

Mean metrics also report ``<metric>_stderr`` (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any

import numpy as np

from flaxlm.tasks.prompts import doc_choices, doc_target
from flaxlm.tasks.spec import METRICS, TaskError, TaskSpec  # noqa: F401  (METRICS: re-export)

MEAN_METRICS = ("acc", "acc_norm", "exact_match")


def gold_index(spec: TaskSpec, doc: dict[str, Any], choices: list[str]) -> list[int]:
    """The gold choice(s) of a multiple-choice document as indices."""
    gold = doc_target(spec, doc)
    golds = gold if isinstance(gold, list) else [gold]
    out = []
    for g in golds:
        if isinstance(g, str):
            if g not in choices:
                raise TaskError(f"task {spec.name!r}: target {g!r} is not one of {choices}")
            g = choices.index(g)
        if not isinstance(g, int) or not 0 <= g < len(choices):
            raise TaskError(f"task {spec.name!r}: target {g!r} is not a choice index")
        out.append(g)
    return out


def doc_metrics(spec: TaskSpec, doc: dict[str, Any], results: list[Any]) -> dict[str, Any]:
    """One document's values (``results``: its requests' results in order)."""
    kind = spec.output_type
    if kind == "multiple_choice":
        choices = doc_choices(spec, doc)
        lls = np.array([ll for ll, _ in results], np.float64)
        golds = gold_index(spec, doc, choices)
        lengths = np.array([float(len(c)) for c in choices])
        return {
            "acc": float(int(np.argmax(lls)) in golds),
            "acc_norm": float(int(np.argmax(lls / lengths)) in golds),
        }
    if kind == "loglikelihood":
        ll, greedy = results[0]
        return {"perplexity": ll, "acc": float(greedy)}
    if kind == "loglikelihood_rolling":
        text = str(doc_target(spec, doc))
        words, size = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        ll = results[0]
        return {"word_perplexity": (ll, words), "byte_perplexity": (ll, size),
                "bits_per_byte": (ll, size)}  # fmt: skip
    gold = doc_target(spec, doc)
    if spec.doc_to_choice is not None:
        gold = doc_choices(spec, doc)[gold]
    golds = [str(g) for g in gold] if isinstance(gold, list) else [str(gold)]
    options = next((m for m in spec.metrics if m.get("metric") == "exact_match"), {})
    return {"exact_match": float(any(exact_match(results[0], g, options) for g in golds))}


def exact_match(prediction: str, reference: str, options: dict[str, Any]) -> bool:
    for pattern in options.get("regexes_to_ignore") or []:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if options.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    for flag, chars in (
        ("ignore_punctuation", string.punctuation),
        ("ignore_numbers", string.digits),
    ):
        if options.get(flag):
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return prediction == reference


def aggregate(spec: TaskSpec, per_doc: list[dict[str, Any]]) -> dict[str, float]:
    """The task's metrics (those of its ``metric_list``) over its documents."""
    out: dict[str, float] = {}
    for entry in spec.metrics:
        name = entry["metric"]
        values = [d[name] for d in per_doc]
        if name in MEAN_METRICS:
            out[name] = float(np.mean(values))
            n = len(values)
            out[f"{name}_stderr"] = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        elif name == "perplexity":
            out[name] = math.exp(-float(np.mean(values)))
        else:
            ll = sum(v[0] for v in values)
            units = sum(v[1] for v in values)
            out[name] = (
                -ll / units / math.log(2) if name == "bits_per_byte" else math.exp(-ll / units)
            )
    return out
