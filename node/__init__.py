"""fedbiomq node package."""
