"""Tests for the server package."""
