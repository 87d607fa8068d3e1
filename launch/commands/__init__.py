"""dpalign CLI subcommands: one module each, cheap to import (heavy imports happen inside main)."""
