"""The OCI distribution client (being split; see issue 11)."""
