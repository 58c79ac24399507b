"""The driver/worker core: ownership, object I/O, task and actor submission and execution.

Runs in every driver and worker process, assembled by `redray.worker.CoreWorker`.
"""
