"""The data plane of one image (being split; see issue 11)."""
