"""Notebook experience: the live dashboard and the batch helpers.

`lmfleet.notebook.batch` needs only the core dependencies (tqdm for its progress
bar, if installed); `lmfleet.notebook.dashboard` needs ipywidgets (the `notebook`
extra) and is imported only when a fleet is displayed in a Jupyter kernel.
"""

from lmfleet.jobs.results import BatchResult, ItemError

__all__ = ["BatchResult", "ItemError"]
