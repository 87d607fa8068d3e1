"""dpalign: launch."""
