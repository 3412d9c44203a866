"""Bridges to other libraries of the field."""
