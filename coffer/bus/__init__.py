"""The message bus: sealed RPC over kombu.

* ``keys``: per-instance keys, the master key file, key wrapping and derivation.
* ``envelope``: the ``Envelope`` that travels, ``seal`` / ``open_sealed``, key rings, the replay
  guard.
* ``transport``: the embedded redis-server broker, transport URLs, kombu connections.
* ``rpc``: ``RpcClient`` (cast, call) and ``RpcServer`` (dispatch to an endpoints object).
"""
