"""dpalign: controller."""
