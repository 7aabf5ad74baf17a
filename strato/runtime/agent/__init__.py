"""The node agent, split by concern (each module's docstring says what it owns):

- ``node``: ``NodeAgent`` itself: lifecycle, client connections, heartbeat, head view,
  and ``ROUTES``, the one table from message kind to handler;
- ``workers``: worker processes, leases, local dispatch of queued tasks;
- ``objects``: owned objects, WANT/OBJ_WANT answers, pulls between nodes, lineage;
- ``actors``: actors hosted here and calls routed to actors anywhere;
- ``routing``: task placement (here, a peer, or waiting), retries, completion, cancel.
"""

from strato.runtime.agent.node import NodeAgent

__all__ = ["NodeAgent"]
