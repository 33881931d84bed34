"""Small helpers shared by every command: rank-aware logging, progress bars, run-directory records."""
