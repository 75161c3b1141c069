"""`python -m sparsediff` (what `accelerate launch -m sparsediff` runs)."""
import sys

from sparsediff.cli import main

sys.exit(main())
