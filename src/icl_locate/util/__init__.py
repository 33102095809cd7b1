"""The bottom layer: errors, files, process memory and progress, used by every other layer."""
