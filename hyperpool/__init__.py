"""hyperpool: a PostgreSQL connection pooler and query-cache proxy."""

__version__ = "0.1.0"
