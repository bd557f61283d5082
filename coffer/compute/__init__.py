"""Compute: where instances' servers run (see :mod:`coffer.compute.base` for the seam).

Deliberately imports nothing: ``python -m coffer.compute.supervisor`` must start with only the
standard library, so import ``coffer.compute.base`` or ``coffer.compute.local`` directly.
"""
