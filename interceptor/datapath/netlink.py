"""pyroute2's rtnetlink client, imported without the rest of pyroute2.

``import pyroute2`` imports every protocol it speaks (about 370 modules and 6 MiB that the
agent would carry for its whole life); the agent needs ``IPRoute`` and its error only."""

from __future__ import annotations

import logging
from typing import Any

from interceptor.lightimport import bare_packages

log = logging.getLogger(__name__)


def _import() -> tuple[Any, Any]:
    try:
        with bare_packages("pyroute2"):
            from pyroute2.iproute.linux import IPRoute as iproute
            from pyroute2.netlink.exceptions import NetlinkError as error
        return iproute, error
    except ImportError as exc:  # another layout: pay for the whole package
        log.info("importing the whole of pyroute2 (%s)", exc)
        from pyroute2 import IPRoute as iproute
        from pyroute2.netlink.exceptions import NetlinkError as error

        return iproute, error


IPRoute, NetlinkError = _import()
