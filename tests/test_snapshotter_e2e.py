"""The containerd snapshotter end to end: Debian's containerd and runc, the
lazyerofs snapshotter, a real registry, a python3 image; `lazyerofs pull`
then `ctr run`. Everything runs under a temp dir and is torn down (tasks,
containerd, snapshotter, every mount) even when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support.containerd import Containerd, Snapshotter, push_tar_image, python_rootfs
from support.localregistry import LocalRegistry

from lazyfs.mount import kernel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LAZYEROFS = [sys.executable, "-m", "lazyfs.cli"]


@pytest.fixture(scope="module")
def py_image(module_registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A python3 image (seekable EROFS, 1 MiB frames) in the registry: base,
    python3, and a layer of data no test workload reads."""
    work = tmp_path_factory.mktemp("pyroot")
    base, py = python_rootfs(work)
    data = work / "data"
    (data / "srv").mkdir(parents=True)
    (data / "srv/unread.bin").write_bytes(os.urandom(12 << 20))
    ref = f"{module_registry.host}/test/python:v1"
    subprocess.run(
        [*LAZYEROFS, "push", "--chunk-size", "1MiB", str(base), str(py), str(data), ref], check=True, capture_output=True
    )
    return ref


def lazy_pull(ctd: Containerd, ref: str) -> dict:
    proc = subprocess.run(
        [*LAZYEROFS, "pull", "--json", "--address", ctd.address, ref], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    return [point for point, _t, _s in kernel.mounts() if point.startswith(prefix)]


def image_stats(sn: Snapshotter) -> dict:
    (images,) = list((sn.root / "images").iterdir())
    return json.loads((images / ".lazyerofs/stats.json").read_text())


def test_lazy_pull_then_ctr_run_prints_the_output_with_no_layer_blob_in_containerd(containerd_env, py_image):
    ctd, sn = containerd_env
    result = lazy_pull(ctd, py_image)
    assert result["layers"] == 3 and result["lazily"] == 3

    run = ctd.ctr(
        "run", "--rm", "--snapshotter", "lazyerofs", py_image, "t1",
        "python3", "-c", "import json, email.mime.text; print('answer', json.dumps({'n': 6 * 7}))",
    )  # fmt: skip
    assert run.stdout.strip() == 'answer {"n": 42}'

    # containerd's content store holds the manifest and the config, nothing else.
    digests = {line.split()[0] for line in ctd.ctr("content", "ls", "-q").stdout.splitlines() if line.strip()}
    host = py_image.split("/", 1)[0]
    req = urllib.request.Request(
        f"http://{host}/v2/test/python/manifests/v1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}
    )
    with urllib.request.urlopen(req) as resp:
        manifest = json.loads(resp.read())
    layer_digests = {layer["digest"] for layer in manifest["layers"]}
    assert digests == {result["manifest_digest"], manifest["config"]["digest"]}
    assert not digests & layer_digests

    # Lazily: the run fetched only part of the layers' blobs.
    stats = image_stats(sn)
    blob_total = sum(layer["size"] for layer in manifest["layers"])
    assert 0 < stats["bytes_fetched"] < blob_total / 2


def test_a_write_inside_the_container_works(containerd_env, py_image):
    ctd, _sn = containerd_env
    lazy_pull(ctd, py_image)
    script = (
        "import os\n"
        "open('/tmp/new', 'w').write('fresh')\n"
        "p = '/usr/lib/python3.11/this.py'\n"
        "open(p, 'a').write('# changed in the container\\n')\n"
        "os.remove('/usr/lib/python3.11/antigravity.py')\n"
        "print(open('/tmp/new').read(), open(p).read().endswith('# changed in the container\\n'),"
        " os.path.exists('/usr/lib/python3.11/antigravity.py'))\n"
    )
    run = ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "w1", "python3", "-c", script)
    assert run.stdout.split() == ["fresh", "True", "False"]
    # A second container sees the image as it was: writes went to the first one's upper dir.
    run = ctd.ctr(
        "run", "--rm", "--snapshotter", "lazyerofs", py_image, "w2",
        "python3", "-c", "import os; print(os.path.exists('/usr/lib/python3.11/antigravity.py'), os.path.exists('/tmp/new'))",
    )  # fmt: skip
    assert run.stdout.split() == ["True", "False"]


def test_snapshots_survive_a_snapshotter_restart_and_a_running_container_keeps_reading(containerd_env, py_image):
    ctd, sn = containerd_env
    lazy_pull(ctd, py_image)
    ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "r1", "python3", "-c", "print(1)")
    before = ctd.ctr("snapshots", "--snapshotter", "lazyerofs", "ls").stdout

    # A container reads files the first run never touched while the snapshotter is down.
    slow = subprocess.Popen(
        ["ctr", "--address", ctd.address, "run", "--rm", "--snapshotter", "lazyerofs", py_image, "r2",
         "python3", "-c", "import time; time.sleep(3); import decimal, asyncio, argparse; print('still reading')"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        sn.stop()
        out, err = slow.communicate(timeout=60)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == 0, err
    assert out.strip() == "still reading"

    sn.start()
    ctd.wait_snapshotter()
    assert ctd.ctr("snapshots", "--snapshotter", "lazyerofs", "ls").stdout == before
    run = ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "r3", "python3", "-c", "import csv, textwrap; print('again')")
    assert run.stdout.strip() == "again"


def test_a_restart_mounts_again_what_died_while_it_was_down(containerd_env, py_image):
    ctd, sn = containerd_env
    lazy_pull(ctd, py_image)
    sn.stop()
    # The image daemon dies (killed, OOM, a reboot of user space): its FUSE
    # mount and the layers' EROFS mounts over it are dead.
    (images,) = list((sn.root / "images").iterdir())
    state = subprocess.run([*LAZYEROFS, "status", "--json"], capture_output=True, text=True, check=True)
    (mine,) = [m for m in json.loads(state.stdout)["mounts"] if m["mountpoint"] == str(images)]
    os.kill(mine["pid"], signal.SIGKILL)
    time.sleep(0.5)

    sn.start()
    ctd.wait_snapshotter()
    log = sn.log.read_text()
    assert "1 image(s) and 3 layer(s) mounted again" in log
    run = ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "d1", "python3", "-c", "import json; print('back')")
    assert run.stdout.strip() == "back"


def test_removing_container_image_and_snapshots_leaves_no_mount(containerd_env, py_image):
    ctd, sn = containerd_env
    lazy_pull(ctd, py_image)
    ctd.ctr("run", "--snapshotter", "lazyerofs", py_image, "c1", "python3", "-c", "print(1)")
    assert len(mounts_under(sn.root)) == 4  # the image's FUSE tree and three layers

    ctd.ctr("containers", "rm", "c1")
    ctd.ctr("images", "rm", "--sync", py_image)
    deadline = time.monotonic() + 30
    while mounts_under(sn.root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mounts_under(sn.root) == []
    assert ctd.ctr("snapshots", "--snapshotter", "lazyerofs", "ls").stdout.split()[3:] == []
    assert list((sn.root / "images").iterdir()) == []
    assert list((sn.root / "snapshots").iterdir()) == []


def test_an_ordinary_tar_image_pulled_by_containerd_runs_on_the_snapshotter(containerd_env, module_registry, tmp_path):
    """Layers that are not EROFS get ordinary snapshots that containerd
    fills itself (Prepare, apply, Commit, then View/Prepare for the rootfs)."""
    ctd, sn = containerd_env
    base, py = python_rootfs(tmp_path / "trees")
    top = tmp_path / "trees/top"
    (top / "etc").mkdir(parents=True)
    (top / "etc/greeting").write_text("from a tar layer\n")
    ref = f"{module_registry.host}/test/tar:v1"
    push_tar_image([base, py, top], ref, tmp_path)
    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "lazyerofs", ref, timeout=300)
    run = ctd.ctr(
        "run", "--rm", "--snapshotter", "lazyerofs", ref, "tar1",
        "python3", "-c", "print(open('/etc/greeting').read().strip())",
    )  # fmt: skip
    assert run.stdout.strip() == "from a tar layer"
    # Nothing lazy here: no image daemon, no layer mount.
    assert list((sn.root / "images").iterdir()) == []
    snaps = ctd.ctr("snapshots", "--snapshotter", "lazyerofs", "ls").stdout.splitlines()[1:]
    assert len(snaps) == 3 and all(line.split()[-1] == "Committed" for line in snaps)


def test_metrics_report_per_image_fetches_and_snapshots(containerd_env, py_image):
    from support.localregistry import free_port

    ctd, sn = containerd_env
    port = free_port()
    sn.stop()
    sn.extra = ("--metrics", f"127.0.0.1:{port}")
    sn.start()
    ctd.wait_snapshotter()
    lazy_pull(ctd, py_image)
    ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "m1", "python3", "-c", "import json")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("lazyerofs_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    image = next(k for k in samples if k.startswith("lazyerofs_image_up{")).split('"')[1]
    assert image.startswith(py_image.split(":v1")[0]) and "@sha256:" in image
    assert samples[f'lazyerofs_image_up{{image="{image}"}}'] == 1
    assert samples[f'lazyerofs_fetched_bytes_total{{image="{image}"}}'] > 0
    assert samples[f'lazyerofs_requests_total{{image="{image}"}}'] > 0
    assert samples[f'lazyerofs_verify_failures_total{{image="{image}"}}'] == 0
    assert samples['lazyerofs_snapshots{kind="remote"}'] == 3
    assert samples['lazyerofs_snapshotter_calls_total{method="Prepare"}'] >= 4


def test_by_default_the_rest_of_the_image_is_fetched_in_the_background(containerd_env, py_image):
    ctd, sn = containerd_env
    sn.stop()
    sn.extra = ()
    sn.start()
    ctd.wait_snapshotter()
    lazy_pull(ctd, py_image)
    deadline = time.monotonic() + 60
    while True:
        layers = image_stats(sn)["layers"]
        if all(layer["frames_present"] == layer["frames_total"] for layer in layers):
            break
        assert time.monotonic() < deadline, layers
        time.sleep(0.2)
    run = ctd.ctr("run", "--rm", "--snapshotter", "lazyerofs", py_image, "p1", "python3", "-c", "import json; print('warm')")
    assert run.stdout.strip() == "warm"


def test_a_layer_the_snapshotter_cannot_mount_fails_the_pull_clearly_and_leaves_nothing(containerd_env, py_image):
    ctd, sn = containerd_env
    sn.stop()
    sn.extra = ("--no-prefetch", "--no-plain-http")  # it cannot reach the plain-HTTP registry
    sn.start()
    ctd.wait_snapshotter()
    proc = subprocess.run(
        [*LAZYEROFS, "pull", "--address", ctd.address, py_image], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert "did not mount layer 0" in proc.stderr and "see its log" in proc.stderr
    assert "not lazily: cannot mount" in sn.log.read_text()
    assert ctd.ctr("snapshots", "--snapshotter", "lazyerofs", "ls").stdout.splitlines()[1:] == []
    assert mounts_under(sn.root) == []
    assert ctd.ctr("images", "ls", "-q").stdout.strip() == ""
