"""Tests for the common package."""
