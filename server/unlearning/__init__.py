"""Unlearning between rounds and between runs."""
