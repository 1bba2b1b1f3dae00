"""Tests of internimage.pretrain."""
