"""cmcd: a self-hosted, multi-tenant mail delivery daemon."""

__version__ = "0.1.0"
