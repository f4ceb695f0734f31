"""Starting nodes: the `Launcher` contract (base.py), local subprocesses (local.py), Ray
actors (ray_launcher.py), GPU discovery (gpus.py), command templates (command.py) and
the supervisor that watches, restarts and stops launched nodes (supervisor.py)."""
