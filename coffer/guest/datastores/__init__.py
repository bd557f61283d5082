"""datastores."""
