"""containerd's API as lazyerofs speaks it: messages (api.py) and a small
client for the pull (client.py, pull.py)."""
