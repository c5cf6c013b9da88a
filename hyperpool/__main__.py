"""``python -m hyperpool`` is the ``hyperpool`` command."""

from hyperpool.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
