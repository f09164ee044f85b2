"""Tests for the client package."""
