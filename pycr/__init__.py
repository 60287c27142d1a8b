"""pycr: checkpoint/restore of live Linux process trees."""

__version__ = "0.1.0"
