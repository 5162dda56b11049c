"""``python -m fedloom`` runs the command line."""

from fedloom.cli.main import main

main()
