"""The family table (see flaxlm/families/base.py): ``gpt`` and ``bert`` are registered here;
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

register_family(GPT_FAMILY, replace=True)
register_family(BERT_FAMILY, replace=True)

__all__ = [
    "BERT_FAMILY",
    "GPT_FAMILY",
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
