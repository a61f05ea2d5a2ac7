"""Bundled example apps (``sideband serve`` without APP serves the order desk)."""
