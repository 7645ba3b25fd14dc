"""A stand-in application that lives in the example image's top layer."""

from pathlib import Path

print(Path("/app/hello.txt").read_text(), end="")
