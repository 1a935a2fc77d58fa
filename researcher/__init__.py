"""fedbiomq researcher package."""
