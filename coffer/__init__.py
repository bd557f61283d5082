"""Coffer: a Database-as-a-Service that speaks the OpenStack Trove v1.0 API."""

__version__ = "0.1.0"
