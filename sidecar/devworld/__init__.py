"""The dev world: local stand-ins that speak AWS's real protocols."""
