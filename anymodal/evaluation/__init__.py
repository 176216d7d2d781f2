"""Benchmark evaluation: ``anymodal eval --task TASK --data DIR --out DIR``.

One reader per benchmark format (:mod:`.data`), generation through the batch runner, and metrics
from the libraries that define them (:mod:`.metrics`); the tasks are rows of :data:`TASKS`.
See docs/evaluation.md.
"""

from .data import READERS, Dataset, Item
from .tasks import TASKS, FeatureOptions, Features, Task, run_eval

__all__ = ["READERS", "TASKS", "Dataset", "FeatureOptions", "Features", "Item", "Task", "run_eval"]
