"""The FLOps logger, shared by the runtime roles and usable from ML repositories.

Usage: ``from flops_utils.logging import logger``.
"""

import logging as _logging
import os
import sys

from flops_utils import env_vars

logger = _logging.getLogger("flops")
if not logger.handlers:
    _handler = _logging.StreamHandler(sys.stderr)
    _handler.setFormatter(
        _logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s", "%H:%M:%S")
    )
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get(env_vars.LOG_LEVEL, "INFO").upper())
    logger.propagate = False
