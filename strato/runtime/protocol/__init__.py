"""Wire formats: a framed channel between a node's own processes, gRPC between machines."""
