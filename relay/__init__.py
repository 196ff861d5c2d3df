"""relay: forward files from landing zones only when they are provably complete."""

__version__ = "0.1.0"
