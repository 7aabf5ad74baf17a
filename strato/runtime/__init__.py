"""strato's task/actor runtime: head service, node agents, workers and the core worker.

Imports nothing from launcher, providers or cli (see DESIGN.md, dependency direction).
"""
