"""Control-DB tables for day-2 operations (issue 6): configuration groups and their values,
parameter rules per datastore version, instance events.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0004_day2``.
"""

from __future__ import annotations
