"""dpalign: accounting."""
