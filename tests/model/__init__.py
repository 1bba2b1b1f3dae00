"""Tests of internimage.model."""
