"""`python -m tunelab.cli`."""

from tunelab.cli import main

main()
