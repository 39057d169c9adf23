"""bootback: run virtual machines straight out of backup files."""

__version__ = "0.1.0"
