"""snag-dist: distributed SNAG trainer."""
__version__ = "0.1.0"
