"""Allow ``python -m nirdml``."""

from nirdml.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
