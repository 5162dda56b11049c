"""The fedloom command line."""
