"""fedbiomq common package."""
