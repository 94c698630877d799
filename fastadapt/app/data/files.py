"""Data files shipped with fastadapt; sources and licences are in ``LICENSES.md`` beside them.

- ``<name>.test.jsonl.gz`` for ``name`` in :data:`EVAL_FILES`: the LLM-Adapters math test sets
  (one JSON object per line with ``instruction``, ``input``, ``output``, ``answer``, exactly
  as in LLM-Adapters' ``dataset/<name>/test.json``);
- ``gsm8k.train.jsonl.gz``: GSM8K train, the original ``train.jsonl`` lines
  (``question``, ``answer`` ending in ``#### <number>``);
- ``gsm8k.test-solutions.jsonl.gz``: GSM8K test, the original ``test.jsonl`` lines with their
  reference solutions (test data: the held-out loss reads it, training refuses it).

Use :mod:`fastadapt.app.data` to read them; this module only locates the files.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["EVAL_FILES", "SOLUTION_FILES", "TEST_FILES", "TRAIN_FILES", "data_file"]

#: Built-in evaluation set name -> file in this package.
EVAL_FILES: dict[str, str] = {
    name: f"{name}.test.jsonl.gz"
    for name in ("AddSub", "MultiArith", "SingleEq", "gsm8k", "SVAMP", "mawps", "AQuA", "mathqa")
}
#: Built-in training set name -> file in this package.
TRAIN_FILES: dict[str, str] = {"gsm8k": "gsm8k.train.jsonl.gz"}
#: Test set name -> its problems with reference solutions (for the held-out loss).
SOLUTION_FILES: dict[str, str] = {"gsm8k": "gsm8k.test-solutions.jsonl.gz"}
#: Every shipped file that holds test questions: never training data.
TEST_FILES: tuple[str, ...] = (*EVAL_FILES.values(), *SOLUTION_FILES.values())


def data_file(filename: str) -> Traversable:
    """The shipped file ``filename`` (a ``Traversable``: use ``.open("rb")``)."""
    shipped = set(TEST_FILES) | set(TRAIN_FILES.values())
    if filename not in shipped:
        raise ValueError(f"filename must be one of the shipped files {sorted(shipped)}, got {filename!r}")
    return resources.files(__package__).joinpath(filename)
