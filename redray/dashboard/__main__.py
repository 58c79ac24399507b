"""The dashboard process: `python -m redray.dashboard`, its configuration as one JSON line
on stdin (see launch.py)."""

import json
import logging
import sys

from redray.dashboard import deps
from redray.node.worker_pool import die_with_parent


def main() -> None:
    config = json.loads(sys.stdin.readline())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.get("die_with_parent"):
        die_with_parent()
    deps.check()
    from redray.dashboard.server import serve  # (aiohttp: only once known to be installed)

    serve(config)


if __name__ == "__main__":
    main()
