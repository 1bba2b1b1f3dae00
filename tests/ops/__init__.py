"""Tests of internimage.ops."""
