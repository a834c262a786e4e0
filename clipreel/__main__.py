"""`python -m clipreel` runs the CLI."""

from clipreel.cli import main

main()
