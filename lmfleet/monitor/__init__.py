"""Watching the nodes: the pure verdict on what a probe said (`judge`), the polling
loop that probes, confirms and records (`loop`), and idle auto-sleep (`autosleep`)."""
