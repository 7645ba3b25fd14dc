"""The snapshot labels a lazy pull and the snapshotter agree on (containerd's names)."""

# The chain ID a remotely made snapshot must be committed under; containerd
# sets it when a snapshotter may make the layer available itself.
TARGET = "containerd.io/snapshot.ref"
# Which image and layer, as CRI (disable_snapshot_annotations = false),
# nerdctl and `lazyerofs pull` label them.
IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
