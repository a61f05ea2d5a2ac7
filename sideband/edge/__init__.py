"""Edge: the aiohttp application. HTTP in, HTTP out; no business logic."""

from sideband.edge.app import SERVICE, create_app

__all__ = ["SERVICE", "create_app"]
