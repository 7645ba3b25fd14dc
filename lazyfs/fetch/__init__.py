"""The bytes of a layer's virtual file (being split; see issue 11)."""
