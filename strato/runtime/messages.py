"""Every message kind that travels between strato's runtime processes, and its fields.

A message is a plain tuple ``(KIND, field, ...)``: tuples of builtins pickle fastest
and batches of them are what every link carries (``protocol.framing`` between a node's
own processes, ``transport`` between machines). Receivers unpack the fields by name
(``_, oid, inline, size = msg``); the comment beside each kind is its layout.

The node agent routes what it receives with one table (``agent.node.ROUTES``) that
names, for each kind below, its handler and the links it may arrive on.
"""

from __future__ import annotations

import enum

# ---------------------------------------------------------------- client -> agent
# (drivers and workers, over the framed unix socket)
HELLO = "hello"                # (HELLO, role, client_id, job_id | None, worker_id[,
                               #  a worker's direct socket path | None])
FN = "fn"                      # (FN, function_id, pickled function or class)
SUBMIT = "submit"              # (SUBMIT, [TaskSpec])
PUT = "put"                    # (PUT, oid, inline bytes | None, size, [(oid, owner_node)] | None)
                               # the last field: refs the value holds (it keeps them alive)
REFS = "refs"                  # (REFS, [ref op])   reference counting, in the order the client
                               # did it, ahead of whatever it sends next (``REF_*`` below)
WANT = "want"                  # (WANT, [(oid, owner_node)])
ACTOR_CREATE = "actor_create"  # (ACTOR_CREATE, TaskSpec, meta, [(oid, owner_node)] | None)
                               # the last field: argument refs, kept until the actor is dead
ACTOR_CALLS = "actor_call"     # (ACTOR_CALLS, [TaskSpec])
CANCEL = "cancel"              # (CANCEL, task_id, force[, leased worker's pid])   also
                               # peer -> agent
KILL_ACTOR = "kill_actor"      # (KILL_ACTOR, actor_id, no_restart)   also agent -> head
RPC = "rpc"                    # (RPC, request id, method, args)   also agent -> head
# remote drivers only (the serverless client, on the head's client endpoint)
SPAWN = "spawn"                # (SPAWN, TaskSpec, retention seconds)   a durable call
CANCEL_SESSION = "cancel_session"  # (CANCEL_SESSION,)   cancel this client's calls in flight
BYE = "bye"                    # (BYE,)   a clean disconnect: the session ends now
# worker -> agent only
DONE = "done"                  # (DONE, task_id, [ReturnValue], retryable)
BLOCKED = "blocked"            # (BLOCKED, [task_id handed back])
UNBLOCKED = "unblocked"        # (UNBLOCKED,)
BOUNCE = "bounce"              # (BOUNCE, [task_id that arrived after BLOCKED])
ACTOR_READY = "actor_ready"    # (ACTOR_READY, actor_id, error bytes | None)
# direct actor calls (``runtime.direct``): a caller asks where a local actor takes calls
ACTOR_WHERE = "actor_where"    # (ACTOR_WHERE, actor_id)
DIRECT_LOST = "direct_lost"    # (DIRECT_LOST, actor_id, pid, [TaskSpec]) or a lease's
#                                 (DIRECT_LOST, None, worker_id, [TaskSpec])
                               # calls (or leased tasks) in flight on a direct channel whose
                               # process went away: the agent retries or fails them as if
                               # it had routed them
# leased workers (``runtime.leases``)
WANT_LEASE = "want_lease"      # (WANT_LEASE, shape key)   lend me a worker of this shape
LEASE_RETURN = "lease_return"  # (LEASE_RETURN, worker_id)

# ---------------------------------------------------------------- agent -> client
WELCOME = "welcome"            # (WELCOME, node_id, shm_dir, spill_dir, agent address)
RESULT = "result"              # (RESULT, [ReturnValue])   also actor worker -> caller, direct
ACTOR_HERE = "actor_here"      # (ACTOR_HERE, actor_id, direct socket path | None, worker pid)
LEASE = "lease"                # (LEASE, shape key, worker_id, direct socket path, pid)
LEASE_REVOKE = "lease_revoke"  # (LEASE_REVOKE, worker_id)   give it back once its task is done
OBJ = "obj"                    # (OBJ, oid, LOCAL | INLINE | ERROR, payload)
RPC_REPLY = "rpc_reply"        # (RPC_REPLY, request id, ok, value)   also head -> agent
LOG = "log"                    # (LOG, [line])   to a driver
WARN = "warn"                  # (WARN, text)    to a driver
RESUMED = "resumed"            # (RESUMED, [ReturnValue], [pending oid])   to a remote
                               # driver that reconnected: what finished while it was away
                               # and what is still running
# agent -> worker only
EXEC = "exec"                  # (EXEC, [TaskSpec], {function_id: blob}, gpu_ids)
ACTOR_INIT = "actor_init"      # (ACTOR_INIT, TaskSpec, blob | None, gpu_ids)
CANCEL_EXEC = "cancel_exec"    # (CANCEL_EXEC, task_id)
CHECKPOINT = "checkpoint"      # (CHECKPOINT,)   the actor's drain hook
FORGET_FNS = "forget_fns"      # (FORGET_FNS, [function ids])   the agent pruned them
# caller -> actor worker, on a direct channel (``runtime.direct``)
DIRECT_CALLS = "dcalls"        # (DIRECT_CALLS, [TaskSpec], {function_id: blob} | None)
# an actor call on a channel that sent one in full before: (DIRECT_ACTOR_CALL, task_id,
# method, args, return_ids, seq); the worker fills in the rest from that first call's spec
DIRECT_ACTOR_CALL = "dacall"
                               # also CANCEL_EXEC

# ---------------------------------------------------------------- agent -> head
REGISTER = "register"          # (REGISTER, node_id, address, total, labels[, hosted actor ids])
HEARTBEAT = "heartbeat"        # (HEARTBEAT, node_id, available, idle_since,
                               #  [(shape, count, infeasible)], store_used, num_actors)
PREEMPTION_NOTICE = "preemption_notice"  # (PREEMPTION_NOTICE, node_id, text)
JOB_STARTED = "job_started"    # (JOB_STARTED, job_id, node_id)
JOB_FINISHED = "job_finished"  # (JOB_FINISHED, job_id)
ACTOR_REGISTER = "actor_register"  # (ACTOR_REGISTER, TaskSpec, meta, blob | None)
ACTOR_STATE = "actor_state"    # (ACTOR_STATE, actor_id, ActorState, node_id, error bytes | None)
ACTOR_WATCH = "actor_watch"    # (ACTOR_WATCH, actor_id, node_id)

# ---------------------------------------------------------------- head -> agent
VIEW = "view"                  # (VIEW, [NodeView], [dead node_id], {node_id: address})
ACTOR_UPDATE = "actor_update"  # (ACTOR_UPDATE, actor_id, ActorState, node_id | None, error)
CREATE_ACTOR = "create_actor"  # (CREATE_ACTOR, TaskSpec, blob | None)
STOP_ACTOR = "stop_actor"      # (STOP_ACTOR, actor_id, final)   kill the actor's process
                               # here; final: no restart follows
NODE_DEAD = "node_dead"        # (NODE_DEAD, node_id)
EXIT = "exit"                  # (EXIT, reason)   the head declared this node dead: stop
DRAIN = "drain"                # (DRAIN,)
ACTOR_CHECKPOINT = "actor_checkpoint"  # (ACTOR_CHECKPOINT, actor_id)
RESERVE_BUNDLES = "reserve_bundles"    # (RESERVE_BUNDLES, pg_id, [(index, shape)])   a
                               # placement group's bundles on this node (``placement``)
RELEASE_BUNDLES = "release_bundles"    # (RELEASE_BUNDLES, pg_id)   give them back
RESERVE_REFUSED = "reserve_refused"    # (RESERVE_REFUSED, pg_id, node_id)   no room here
                               # now (the head's view lagged): the group goes back to pending
PG_REMOVED = "pg_removed"      # (PG_REMOVED, pg_id)   to every node: fail its tasks

# ---------------------------------------------------------------- agent -> agent
PEER_HELLO = "hello"           # (PEER_HELLO, node_id)   first message of a peer stream
REQUEST = "req"                # (REQUEST, request id, sender node_id, inner message)
REPLY = "rep"                  # (REPLY, request id, value)
RUN_TASK = "run_task"          # (RUN_TASK, TaskSpec, blob | None, may wait there for room)
TASK_REJECTED = "task_rejected"  # (TASK_REJECTED, TaskSpec, rejecting node_id[, no function])
TASK_DONE = "task_done"        # (TASK_DONE, TaskSpec, [ReturnValue], retryable, ran_on node_id)
OBJ_WANT = "obj_want"          # (OBJ_WANT, oid, requesting node_id)
OBJ_INFO = "obj_info"          # (OBJ_INFO, oid, object info)
PULL_CHUNK = "pull_chunk"      # (PULL_CHUNK, oid, offset, length)   a REQUEST: reply (ok, bytes | reason)
BULK_PORT = "bulk_port"        # (BULK_PORT,)   a REQUEST: reply the node's bulk port (0: none)
FREE_COPIES = "free_copies"    # (FREE_COPIES, [oid])
OBJ_COPY = "obj_copy"          # (OBJ_COPY, oid, node_id)   to the owner: that node pulled a copy
                               # (freed with the object; at once if it is freed already)
REF_OPS = "ref_ops"            # (REF_OPS, sender node_id, [peer ref op])   to an object's owner;
                               # a REQUEST (acknowledged) when it holds PEER_BORROW/PEER_CONTAIN
PEER_ACTOR_CALL = "peer_actor_call"  # (PEER_ACTOR_CALL, TaskSpec)   to the actor's node
JOB_LOG = "job_log"            # (JOB_LOG, job_id, [line])   to the driver's node

# ---------------------------------------------------------------- reference counting
# An object lives while its owning client holds a ref, or a borrower (a local client, or
# another node on behalf of its clients) holds one, or a live object's value contains it.
# Ops of REFS (client -> its agent): a bare oid: the owner client dropped its last ref;
REF_BORROWED = 1               # (REF_BORROWED, oid, owner_node)   holds a ref it does not own
REF_UNBORROWED = 2             # (REF_UNBORROWED, oid)   dropped its last copy of it
REF_CONTAINS = 3               # (REF_CONTAINS, container oid, container owner_node,
                               #  [(oid, owner_node)])   a task result holds these refs
REF_ADOPT = 4                  # (REF_ADOPT, oid, object info | None)   a direct call's
                               # result the agent never saw escapes: keep it from now on
                               # (None: not finished yet, REF_ADOPTED_READY follows)
REF_ADOPTED_READY = 5          # (REF_ADOPTED_READY, oid, object info)   if still kept
# Ops of REF_OPS (agent -> the owner's agent):
PEER_BORROW = 1                # (PEER_BORROW, oid)   the sender's clients hold it
PEER_UNBORROW = 2              # (PEER_UNBORROW, oid)   ... no longer
PEER_CONTAIN = 3               # (PEER_CONTAIN, oid, container oid, container owner_node)
PEER_UNCONTAIN = 4             # (PEER_UNCONTAIN, oid, container oid)   the container is freed

# ---------------------------------------------------------------- object info
# Where an object's value is, as owners and agents pass it around (TaskSpec.dep_values,
# OBJ_INFO, a core worker's value table): (INLINE, bytes) | (ERROR, bytes) |
# (AT_NODE, node_id, size). OBJ tells a client LOCAL: it is in this node's store now.
INLINE = "inline"
ERROR = "error"
AT_NODE = "node"
LOCAL = "local"


class ActorState(enum.StrEnum):
    """An actor's state as the head records it and tells the agents (ACTOR_UPDATE)."""

    PENDING = "pending"        # registered, not placed yet
    ALIVE = "alive"
    RESTARTING = "restarting"  # died with restarts left: being placed again
    DEAD = "dead"
    FAILED = "failed"          # only in ACTOR_STATE: ``__init__`` raised (no restart)
