"""DNS wire format: names, records, and the assembly of responses from precomputed bytes."""
