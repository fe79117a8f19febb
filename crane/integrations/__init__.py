"""Crane inside other frameworks (optional extras; nothing else in ``crane`` imports these modules)."""
