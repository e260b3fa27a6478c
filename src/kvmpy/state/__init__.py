"""The whole state of a VM as plain data: save, validate, restore (snapshots and migration)."""
