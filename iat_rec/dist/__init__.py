"""Processes and storage: launch and the process group, checkpoints (DCP), atomic writes, checksums."""
