"""taskmanager."""
