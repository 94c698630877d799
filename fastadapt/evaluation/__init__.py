"""Scoring for ``fastadapt eval``: answer extraction from generations (see :mod:`.answers`)."""

from fastadapt.evaluation.answers import (
    COMMONSENSE_LABELS,
    clean_generation,
    commonsense_family,
    extract_choice,
    extract_commonsense,
    extract_number,
    numbers_equal,
    score,
)

__all__ = [
    "COMMONSENSE_LABELS",
    "clean_generation",
    "commonsense_family",
    "extract_choice",
    "extract_commonsense",
    "extract_number",
    "numbers_equal",
    "score",
]
