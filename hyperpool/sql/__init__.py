"""SQL understood with PostgreSQL's own grammar (pgparse / libpg_query); pure, no I/O."""
