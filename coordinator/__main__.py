"""`python -m coordinator ...` is the `coordinator` console script."""
from coordinator.cli import main

raise SystemExit(main())
