"""Tests of the vault part (cache images)."""
