"""The long-running service: scheduler, link and device watch."""
