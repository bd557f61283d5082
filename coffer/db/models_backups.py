"""Control-DB tables for backups (issue 5): backups, schedules, strategies.

Imported at the bottom of ``coffer.db.models`` so every table shares one metadata. Schema changes
here go into the Alembic revision ``0003_backups``.
"""

from __future__ import annotations
