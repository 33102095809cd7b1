"""Tasks: data on disk, the task registry, metrics and the code sandbox."""
