"""Starting node processes: locally as subprocesses (and, later, on Ray)."""
