"""A stand-in application that lives in the example image's top layer."""

print(open("/app/hello.txt").read(), end="")
