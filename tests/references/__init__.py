"""Independent references the tests compare the package against (never shipped in the wheel)."""
