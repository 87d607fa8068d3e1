"""dpalign: cluster."""
