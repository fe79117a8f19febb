"""Crane inside other frameworks (optional extras; nothing else in :mod:`crane` imports these modules)."""
