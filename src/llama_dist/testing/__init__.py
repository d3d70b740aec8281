"""Helpers for tests of distributed code on CPU."""
