"""From a task's documents to requests, formatted exactly as lm-evaluation-harness does.

A document becomes text through ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``: a
field name, a Jinja2 template (``"{{question}}"``, StrictUndefined, trailing newlines kept)
or a literal. The prompt of a document is::

    [description + fewshot_delimiter]
    text(shot_1) + target_delimiter + answer(shot_1) + fewshot_delimiter   (k shots)
    ...
    text(doc)

and its requests (``Request``): multiple choice, one log-likelihood of
``target_delimiter + choice`` per choice; ``loglikelihood``, of the target; rolling
log-likelihood, of the whole target document (no prompt); ``generate_until``, greedy text
after the prompt until a stop string. Few-shot examples are drawn by one ``random.Random``
seeded once per task (the harness's ``fewshot_random_seed``, 1234 by default) and consumed
document after document, so the same documents, seed and ``limit`` give the same prompts here
and in the harness.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from typing import Any

from flaxlm.tasks.spec import TaskError, TaskSpec

FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed


@dataclass(frozen=True)
class Request:
    """One model call: ``kind`` is ``loglikelihood`` (``context``, ``continuation``),
    ``loglikelihood_rolling`` (``continuation`` = the document) or ``generate_until``
    (``context``, ``until``, ``max_gen_toks``); ``doc`` and ``index`` (the choice) locate it."""

    kind: str
    doc: int
    index: int
    context: str = ""
    continuation: str = ""
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256


def _jinja():
    try:
        from jinja2 import BaseLoader, Environment, StrictUndefined
    except ImportError:  # pragma: no cover - jinja2 is a dependency
        raise TaskError("task templates need jinja2: pip install jinja2") from None
    env = Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(
        pattern, repl, s, count=count
    )
    return env


_ENV = None


def render(template: Any, doc: dict[str, Any], task: str, what: str) -> Any:
    """A doc_to_* entry applied to ``doc``: a field name, a template, or a literal."""
    global _ENV
    if not isinstance(template, str):
        return template  # an int target index or a literal list of choices
    if template in doc:
        return doc[template]
    if _ENV is None:
        _ENV = _jinja()
    try:
        return _ENV.from_string(template).render(**doc)
    except Exception as exc:  # jinja2 raises its own error types
        raise TaskError(f"task {task!r}: {what} {template!r}: {exc}") from None


def doc_text(spec: TaskSpec, doc: dict[str, Any]) -> str:
    text = render(spec.doc_to_text, doc, spec.name, "doc_to_text")
    if not isinstance(text, str):
        raise TaskError(f"task {spec.name!r}: doc_to_text gave {text!r}, expected a string")
    return text


def doc_choices(spec: TaskSpec, doc: dict[str, Any]) -> list[str]:
    choices = render(spec.doc_to_choice, doc, spec.name, "doc_to_choice")
    if isinstance(choices, str):
        choices = ast.literal_eval(choices)  # a template that renders "['a', 'b']"
    if isinstance(choices, dict):
        choices = list(choices.values())
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"task {spec.name!r}: doc_to_choice gave {choices!r}, not strings")
    return choices


def doc_target(spec: TaskSpec, doc: dict[str, Any]) -> Any:
    """The target as the harness reads it: a template that renders digits is an index when
    the task has choices; one that renders ``[...]`` is a list."""
    target = render(spec.doc_to_target, doc, spec.name, "doc_to_target")
    if isinstance(target, str) and spec.doc_to_target not in doc:
        if target.isdigit() and spec.doc_to_choice is not None:
            return ast.literal_eval(target)
        if len(target) >= 2 and target[0] == "[" and target[-1] == "]":
            try:
                return ast.literal_eval(target)
            except (SyntaxError, ValueError):
                return target
    return target


def answer_text(spec: TaskSpec, doc: dict[str, Any]) -> str:
    """The answer a few-shot example shows: the chosen choice, the first of several targets,
    or the target itself."""
    target = doc_target(spec, doc)
    if spec.doc_to_choice is not None and isinstance(target, int):
        return doc_choices(spec, doc)[target]
    if isinstance(target, list):
        return target[0]
    return str(target)


class FewshotSampler:
    """The harness's ContextSampler / FirstNSampler over a task's few-shot split."""

    def __init__(self, spec: TaskSpec, seed: int = FEWSHOT_SEED):
        self.spec, self.rnd = spec, random.Random(seed)

    def sample(self, n: int, doc: dict[str, Any]) -> list[dict[str, Any]]:
        pool = self.spec.fewshot_docs
        if n == 0:
            return []
        if len(pool) < n + self.spec.fewshot_is_eval_split:
            raise TaskError(
                f"task {self.spec.name!r}: {n} few-shot examples asked, its few-shot split "
                f"has {len(pool)} documents"
            )
        exclude = self.spec.fewshot_is_eval_split
        if self.spec.fewshot_sampler == "first_n":
            return ([d for d in pool if d != doc] if exclude else pool)[:n]
        if not exclude:
            return self.rnd.sample(pool, n)
        shots = [d for d in self.rnd.sample(pool, n + 1) if d != doc][:n]
        if len(shots) < n:  # duplicates of doc were drawn: the harness draws again without
            shots = self.rnd.sample([d for d in pool if d != doc], n)
        return shots


def prompt(spec: TaskSpec, doc: dict[str, Any], shots: list[dict[str, Any]]) -> str:
    """The context of ``doc`` with its few-shot examples (module doc)."""
    parts = [spec.description + spec.fewshot_delimiter] if spec.description else []
    for shot in shots:
        text, answer = doc_text(spec, shot), answer_text(spec, shot)
        parts.append(text + spec.target_delimiter + answer + spec.fewshot_delimiter)
    parts.append(doc_text(spec, doc))
    return "".join(parts)


def build_requests(
    spec: TaskSpec, num_fewshot: int | None = None, limit: int | None = None
) -> list[Request]:
    """The requests of the first ``limit`` documents (all for None) with ``num_fewshot``
    examples each (None: the task's own ``num_fewshot``)."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise TaskError(f"num_fewshot={k} must be >= 0")
    sampler = FewshotSampler(spec)
    docs = spec.docs[:limit] if limit else spec.docs
    requests: list[Request] = []
    for i, doc in enumerate(docs):
        if spec.output_type == "loglikelihood_rolling":
            requests.append(
                Request("loglikelihood_rolling", i, 0, continuation=doc_target(spec, doc))
            )
            continue
        context = prompt(spec, doc, sampler.sample(k, doc))
        if spec.output_type == "multiple_choice":
            for j, choice in enumerate(doc_choices(spec, doc)):
                cont = spec.target_delimiter + choice
                requests.append(Request("loglikelihood", i, j, context, cont))
        elif spec.output_type == "loglikelihood":
            cont = str(doc_target(spec, doc))
            requests.append(Request("loglikelihood", i, 0, context, cont))
        else:
            requests.append(generation_request(spec, i, context))
    return requests


def generation_request(spec: TaskSpec, doc: int, context: str) -> Request:
    """A ``generate_until`` request with the task's ``generation_kwargs`` (greedy only)."""
    kwargs = dict(spec.generation_kwargs)
    until = kwargs.pop("until", [spec.fewshot_delimiter]) or []  # the harness's default
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = int(kwargs.pop("max_gen_toks", 256))
    sampled = kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0)
    if sampled or kwargs:
        raise TaskError(
            f"task {spec.name!r}: generation_kwargs {sorted(kwargs) or ['do_sample']}: flaxlm "
            "generates greedily (until, max_gen_toks, do_sample: false, temperature: 0)"
        )
    return Request("generate_until", doc, 0, context, until=tuple(until), max_gen_toks=max_gen_toks)
