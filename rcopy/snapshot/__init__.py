"""Snapshot back-ends (LVM thin, dm-snapshot) behind one interface."""
