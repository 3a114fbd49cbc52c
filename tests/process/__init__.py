"""Process tier: real processes and external binaries, no root."""
