"""Control DB access: engine creation, sessions and migrations."""
