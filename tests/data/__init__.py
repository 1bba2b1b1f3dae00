"""Tests of internimage.data."""
