"""fedbiomq aggregators package."""
