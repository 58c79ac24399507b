"""redray's seed examples: remote tasks, then an actor. Runs with Ray too.

    python examples/quickstart.py

`redray.init()` with no address starts a private cluster on this machine (an embedded
Redis and one node with a pool of worker processes) and tears it down at exit. To use a
cluster started with `redray start --head` instead, pass `address="auto"`. The same script
runs on Ray by changing the import to `import ray as redray`.
"""

import redray

redray.init()


# A task: a function that runs in a worker process; `.remote()` returns an ObjectRef at once.
@redray.remote
def square(x: int) -> int:
    return x * x


futures = [square.remote(i) for i in range(10)]
print(redray.get(futures))  # [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]


# An actor: a class instance living in its own worker process; method calls run in order.
@redray.remote
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def increment(self) -> None:
        self.n += 1

    def read(self) -> int:
        return self.n


counter = Counter.remote()
for _ in range(3):
    counter.increment.remote()
print(redray.get(counter.read.remote()))  # 3

redray.shutdown()
