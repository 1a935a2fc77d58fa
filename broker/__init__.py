"""fedbiomq broker package."""
