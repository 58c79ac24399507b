"""Durable job queues on Redis Streams whose consumers are actors.

    from redray.durable import Queue

    queue = Queue("emails")                      # in the cluster redray.init() connected to
    job = queue.enqueue(send_email, "a@b.c")     # kept in Redis until run and stored
    queue.consume(send_email, num_consumers=4)   # 4 consumer actors on the cluster
    job.get(timeout=10)

Delivery is at least once: a job whose consumer dies mid-job is run again by another one
once the dead consumer's heartbeat lapses. See docs/queues.md.
"""

from redray.durable.actors import Consumers
from redray.durable.client import QueueClient, connect
from redray.durable.consumer import Consumer, ConsumerSettings
from redray.durable.jobs import (
    ChordError,
    JobContext,
    JobError,
    JobFailedError,
    JobRevokedError,
    JobSpec,
    JobTimeoutError,
    NotRegisteredError,
    Retry,
    WorkerLostError,
    current_job,
)
from redray.durable.queue import Job, Queue

__all__ = [
    "ChordError",
    "Consumer",
    "ConsumerSettings",
    "Consumers",
    "Job",
    "JobContext",
    "JobError",
    "JobFailedError",
    "JobRevokedError",
    "JobSpec",
    "JobTimeoutError",
    "NotRegisteredError",
    "Queue",
    "QueueClient",
    "Retry",
    "WorkerLostError",
    "connect",
    "current_job",
]
