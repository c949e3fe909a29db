"""(family group: specs to be added)"""
SPECS = ()
