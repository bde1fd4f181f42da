"""prefopt's version, apart from the package's lazy API (importing it imports nothing else)."""

__version__ = "0.1.0"
