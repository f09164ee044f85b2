"""Test suite of fedembed, mirroring the package layout."""
