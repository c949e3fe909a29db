"""Placeholder: specs land here (issue 11)."""
SPECS = ()
