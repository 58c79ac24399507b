"""Runtime environments: the code, packages and variables a task, actor or job runs with.

`spec` checks and merges runtime_env dicts as Ray does; `packaging` turns a driver's local
directories into content-addressed packages stored in Redis; `node` makes them real on a node
(unpacked once into a cache, one virtualenv per requirement set) for the raylet's workers and
job entrypoints. Redis keys are in `keys`.
"""
