"""strato's task/actor runtime: head service, node agents, workers and the core worker.

Imports nothing from launcher, providers or cli: they depend on the runtime, never the
other way round.
"""
