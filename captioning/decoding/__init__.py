"""Decoding: greedy, beam and sampling search and their jitted entry points."""
