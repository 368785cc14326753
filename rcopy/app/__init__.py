"""The application layer: what the CLI and the daemon call, and the backup's agent.

``session`` runs a sync as the product promises it (group lock, peer, resume of origins left suspended,
reconcile, the plan, the report); ``agent`` is the backup's half of the control channel; ``service`` is
the daemon loop; ``progress`` reports a running sync. cli/ and the daemon stay thin callers of these.
"""
