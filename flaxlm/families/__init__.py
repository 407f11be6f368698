"""The family table (see flaxlm/families/base.py): ``gpt``, ``bert`` and ``t5`` are registered here;
users register their own with :func:`register_family`."""

from flaxlm.families.base import (
    Baseline,
    Family,
    ReportField,
    TaskScoring,
    build_model,
    family_of,
    get_family,
    register_family,
    registered_families,
    report_lines,
    summary_line,
)
from flaxlm.families.bert import BERT_FAMILY
from flaxlm.families.gpt import GPT_FAMILY
from flaxlm.families.t5 import T5_FAMILY

register_family(GPT_FAMILY, replace=True)
register_family(BERT_FAMILY, replace=True)
register_family(T5_FAMILY, replace=True)

__all__ = [
    "BERT_FAMILY",
    "GPT_FAMILY",
    "T5_FAMILY",
    "Baseline",
    "Family",
    "ReportField",
    "TaskScoring",
    "build_model",
    "family_of",
    "get_family",
    "register_family",
    "registered_families",
    "report_lines",
    "summary_line",
]
