"""Integrations with other tools. Each is a leaf: nothing else in :mod:`crane` imports them."""
