"""Training and evaluation data of the LLM-Adapters workflow: the shipped files (:mod:`.files`,
sources and licences in ``LICENSES.md``) and the readers (:mod:`.records`)."""

from .files import EVAL_FILES, SOLUTION_FILES, TEST_FILES, TRAIN_FILES, data_file
from .records import (
    BUILTIN_EVAL_SETS,
    BUILTIN_SOLUTION_SETS,
    BUILTIN_TRAIN_SETS,
    gsm8k_solution_to_output,
    load_eval_set,
    load_solution_records,
    load_train_records,
    resolve_eval_name,
    to_hf_dataset,
)

__all__ = [
    "BUILTIN_EVAL_SETS",
    "BUILTIN_SOLUTION_SETS",
    "BUILTIN_TRAIN_SETS",
    "EVAL_FILES",
    "SOLUTION_FILES",
    "TEST_FILES",
    "TRAIN_FILES",
    "data_file",
    "gsm8k_solution_to_output",
    "load_eval_set",
    "load_solution_records",
    "load_train_records",
    "resolve_eval_name",
    "to_hf_dataset",
]
