"""Job submission: entrypoint commands queued in Redis, placed on a node by the control loop's
leader (FIFO, by entrypoint resources), run there by the raylet as a supervised process
group, with their output kept in Redis so any machine can read it.

`sdk` is the client (`JobSubmissionClient`, Ray's names), `scheduler` the leader's FIFO queue,
`supervisor` the raylet's side, `cli` the `redray job` commands, `keys` every Redis key.
"""
