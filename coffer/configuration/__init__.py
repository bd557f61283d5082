"""Configuration groups (issue 6): parameter rules per datastore version, checking values
against them, and the groups a project keeps.

* ``coffer.configuration.parameter_rules``: the rules, in Trove's ``validation-rules.json``
  format; the files Coffer ships per engine live in ``rules/<manager>.json``.
* ``coffer.configuration.values``: ``validate_values`` - a group's values against its rules
  (422 naming the parameter and the rule).
* ``coffer.configuration.groups``: creating, changing, listing and deleting groups, their
  Trove views, and ``configuration_values_for_instance`` for attach and apply.
"""
