"""kairos hooks of the tunvpn plugin (none yet: the node integration binds the data plane later)."""
