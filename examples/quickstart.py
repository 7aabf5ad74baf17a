"""strato on the embedded default: a local head + node, no cloud account needed."""

import strato


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


if __name__ == "__main__":
    strato.init()
    refs = [square.remote(i) for i in range(1000)]
    print("sum of squares:", sum(strato.get(refs)))
    counter = Counter.remote()
    print("counter:", strato.get([counter.inc.remote() for _ in range(3)]))
    print("cluster:", strato.cluster_resources())
    strato.shutdown()
