"""strato's main job on the embedded default: a laptop calling functions on its own
cluster as if it were serverless. The cluster here is local processes
(examples/clusters/local.yaml, no cloud account); point init(cluster=...) at an AWS, GCP
or SSH cluster config and the same code runs there.

`strato down examples/clusters/local.yaml` stops the cluster afterwards.
"""

import os

import strato

CLUSTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clusters", "local.yaml")


@strato.remote(num_cpus=1, max_retries=3)
def square(x):
    return x * x


@strato.remote
class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


@strato.remote
def greet(name):
    print(f"hello, {name}")          # printed here, prefixed with (greet pid=..., node=...)
    return f"hi {name}"


if __name__ == "__main__":
    strato.init(cluster=CLUSTER)      # brings the cluster up if needed, else attaches
    print("sum of squares:", sum(square.map(range(1000))))
    counter = Counter.remote()
    print("counter:", strato.get([counter.inc.remote() for _ in range(3)]))
    call = greet.spawn("durable call")  # kept on the head even if this process exits
    print("spawned", call.id, "->", strato.FunctionCall.from_id(call.id).get(timeout=60))
    print("cluster:", strato.cluster_resources())
    strato.shutdown()
