"""Bundled tasks (orders-json, shop-sql, handbook-qa, general, safety) and the loader for your own.

Each task is a folder with a task.yaml (see `tunelab.config.task.TaskSpec`), JSONL splits and assets.
The generators that wrote them live in `tunelab.tasks._gen`; rerun one with
`python -m tunelab.tasks.generate orders-json --out DIR --train 1000 --validation 200 --test 200 --seed 0`.
"""

from tunelab.tasks.task import TASKS_DIR, Task, canonical_json, list_tasks, load_task, tasks_table

__all__ = ["TASKS_DIR", "Task", "canonical_json", "list_tasks", "load_task", "tasks_table"]
