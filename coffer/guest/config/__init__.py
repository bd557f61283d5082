"""Engine-side configuration overrides: applying a configuration group's values in a guest.

* ``coffer.guest.config.overrides``: the shared part (``OverridesHandler``): checking values,
  working out what changed, keeping the applied values in the instance's volume so they survive
  restarts of the engine and of the agent, and telling which changes wait for a restart.
* ``mariadb``: ``SET GLOBAL`` live, and ``etc/overrides.cnf`` (included by ``my.cnf``).
* ``postgresql``: ``ALTER SYSTEM`` (kept by the server in ``postgresql.auto.conf``) + reload;
  the server itself says which changes are pending a restart.
* ``redis``: ``CONFIG SET`` live, and ``etc/overrides.conf`` (included by ``redis.conf``).

Each engine's datastore owns one handler as ``datastore.overrides``; the guest agent's
``apply_overrides`` RPC calls it.
"""
