"""Pure replication logic: states, transitions, plans. Imports nothing from rcopy.sys."""
