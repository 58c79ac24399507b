"""Transport: framed, authenticated connections and the one I/O thread that owns them.

Runs in every redray process (drivers, workers, raylets); knows nothing of tasks or objects.
"""
