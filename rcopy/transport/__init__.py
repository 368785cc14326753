"""Moving bytes: the NBD wire format, client, export, and the control channel to peers."""
