"""`python -m leukemia ...`: the command-line edge of the library."""

from leukemia.cli import main

raise SystemExit(main())
