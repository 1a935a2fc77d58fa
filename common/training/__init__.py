"""The training-plan convention, shared by nodes (which run plans) and researchers (who write them)."""
