"""Spot-instance training that survives preemption.

A small numpy linear model is trained by an actor on spot workers (``resources={"spot": 1}``
here; on a cluster, the spot node type's resources). It checkpoints every
``--every`` steps and when its node gets a preemption notice; if the node is taken, the
actor restarts on a replacement (``max_restarts=-1``), loads the last checkpoint and
continues. Data for step i comes from a generator seeded by i, so a resumed run ends
with exactly the weights of an uninterrupted one.

    python examples/spot_training.py --steps 300 --every 25     # local cluster
    python examples/spot_training.py --address auto               # on a cluster node
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time

import numpy as np

import strato

DIM = 32


def initial_weights() -> np.ndarray:
    return np.random.default_rng(0).normal(size=DIM)


def sgd_step(w: np.ndarray, step: int, lr: float = 0.01) -> np.ndarray:
    """One deterministic step: the batch depends only on the step number."""
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(64, DIM))
    y = x @ np.linspace(-1, 1, DIM) + 0.01 * rng.normal(size=64)
    grad = 2 * x.T @ (x @ w - y) / len(y)
    return w - lr * grad


def train_locally(steps: int) -> np.ndarray:
    """The uninterrupted run, for comparison."""
    w = initial_weights()
    for step in range(steps):
        w = sgd_step(w, step)
    return w


@strato.remote(max_restarts=-1, max_task_retries=-1, max_concurrency=2, resources={"spot": 1})
class Trainer:
    def __init__(self, key: str, every: int, step_seconds: float = 0.0):
        self.key = key
        self.every = every
        self.step_seconds = step_seconds
        self.lock = threading.Lock()
        state = strato.checkpoint.load(key)
        if state is None:
            self.w, self.step, self.resumed_from = initial_weights(), 0, None
        else:
            self.w, self.step, self.resumed_from = state["w"], state["step"], state["step"]

    def _save(self) -> None:
        with self.lock:
            state = {"w": self.w.copy(), "step": self.step}
        strato.checkpoint.save(self.key, state)

    def train_until(self, total: int) -> dict:
        """Idempotent: a retried call after a restart just continues to ``total``."""
        while self.step < total:
            with self.lock:
                self.w = sgd_step(self.w, self.step)
                self.step += 1
            if self.step % self.every == 0:
                self._save()
            if self.step_seconds:
                time.sleep(self.step_seconds)
        return {"w": self.w, "step": self.step, "resumed_from": self.resumed_from,
                "node": strato.get_runtime_context().get_node_id()}

    def progress(self) -> int:
        return self.step

    def checkpoint_on_drain(self) -> None:
        """Called by strato when this node gets a spot preemption notice."""
        self._save()


def digest(w: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(w).tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--key", default="spot-training-demo")
    args = parser.parse_args()
    if args.address:
        strato.init(address=args.address)
    else:
        strato.init(resources={"spot": 1})
    strato.checkpoint.delete(args.key)
    trainer = Trainer.remote(args.key, args.every)
    result = strato.get(trainer.train_until.remote(args.steps))
    expected = train_locally(args.steps)
    print(f"trained {result['step']} steps on node {result['node'][:8]} "
          f"(resumed from {result['resumed_from']}); weights {digest(result['w'])}, "
          f"uninterrupted {digest(expected)}, equal: {np.array_equal(result['w'], expected)}")
    strato.shutdown()


if __name__ == "__main__":
    main()
