"""The mount side of security: what a local user can reach, what umount
touches, what goes into files, what the user is told.

Unprivileged checks run as ``nobody`` through ``setpriv``, in directories
nobody can traverse (pytest's own temp dirs are 0700, which would hide
every mount from them and prove nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.blobtools import make_blob
from support.mount import LAZYEROFS, Mounter, force_cleanup, lazyerofs, make_tree
from support.registry import push_descriptors

from lazyfs.errors import MountError
from lazyfs.mount import kernel as kmount
from lazyfs.mount import state as mount_state
from lazyfs.produce.mkfs import make_erofs

pytestmark = pytest.mark.e2e

CHUNK = 64 << 10
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
NOBODY_UID = 65534


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*NOBODY, *cmd], capture_output=True, text=True, errors="replace", timeout=60, stdin=subprocess.DEVNULL
    )


def start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[19])


def mount_options(target: str) -> set[str]:
    """Per-mount options (field 6 of mountinfo) of the topmost mount at ``target``."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if fields[4] == target:
                found = set(fields[5].split(","))
    assert found is not None, f"{target} is not mounted"
    return found


def wait_gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temp dir every user can traverse (0755 under /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="lazyerofs-sec-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        if not [t for t, _, _ in kmount.mounts() if t.startswith(str(d) + "/")]:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_mounter(open_tmp: Path) -> Iterator[Mounter]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("setpriv") is None:
        pytest.skip("needs root, /dev/fuse and setpriv")
    m = Mounter(open_tmp)
    try:
        yield m
    finally:
        m.cleanup()


def push_trees(registry, tmp: Path, name: str, trees: list[Path]) -> str:
    images = []
    for i, tree in enumerate(trees):
        image = tmp / f"{name}-{i}.erofs"
        make_erofs(tree, image)
        images.append(str(image))
    ref = f"{registry.host}/test/{name}:v1"
    lazyerofs("push", "--chunk-size", str(CHUNK), *images, ref)
    return ref


def push_blobs(registry, name: str, layers: list[tuple[bytes, dict]]) -> str:
    return push_descriptors(registry, name, layers)


def hostile_tree(root: Path) -> None:
    """A setuid-root copy of id(1) and a world-writable /dev/null node."""
    (root / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/id", root / "bin" / "id")
    os.chown(root / "bin" / "id", 0, 0)
    (root / "bin" / "id").chmod(0o4755)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "null").chmod(0o666)


@pytest.fixture(scope="module")
def plain_image(module_registry, tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("plainimg")
    make_tree(tmp / "tree", 1, big=200_000)
    return push_trees(module_registry, tmp, "plainimg", [tmp / "tree"])


# --- critical: no local root through the mounts ------------------------------------


@pytest.mark.parametrize("layers", [1, 2], ids=["bind", "overlay"])
def test_setuid_binaries_and_device_nodes_of_an_image_give_a_local_user_nothing(
    open_mounter: Mounter, registry, tmp_path: Path, layers: int
):
    hostile_tree(tmp_path / "t0")
    trees = [tmp_path / "t0"]
    if layers == 2:
        (tmp_path / "t1" / "etc").mkdir(parents=True)
        (tmp_path / "t1" / "etc" / "hello").write_text("hi\n")
        trees.append(tmp_path / "t1")
    ref = push_trees(registry, tmp_path, f"hostile{layers}", trees)
    # A run dir left world-traversable (by an older version) is tightened.
    with contextlib.suppress(FileNotFoundError):
        mount_state.RUN_DIR.chmod(0o755)

    m = open_mounter(ref, rootfs=True)
    assert m.rootfs is not None
    rootfs = str(m.rootfs)
    ran = as_nobody(f"{rootfs}/bin/id", "-u")
    assert ran.returncode == 0, ran.stderr  # the rootfs still runs programs
    assert ran.stdout.strip() == str(NOBODY_UID)
    wrote = as_nobody("sh", "-c", f"printf x > {rootfs}/null")
    assert wrote.returncode != 0
    assert {"nosuid", "nodev"} <= mount_options(rootfs)

    # The per-layer mounts: in a 0700 dir, and nothing to run or open there even for root.
    # (After the rootfs checks, which show the attack itself.)
    state = mount_state.state_dir(str(m.dir))
    for d in (mount_state.RUN_DIR, state):
        st = d.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0, d
    lower = state / "erofs" / "0"
    assert as_nobody("ls", str(lower)).returncode != 0
    assert as_nobody(f"{lower}/bin/id", "-u").returncode != 0
    with pytest.raises(PermissionError):
        subprocess.run([f"{lower}/bin/id", "-u"], check=False)
    with pytest.raises(PermissionError):
        open(lower / "null", "wb").close()
    assert {"nosuid", "nodev", "noexec"} <= mount_options(str(lower))


def test_rootfs_allow_suid_dev_is_an_explicit_opt_out(open_mounter: Mounter, registry, tmp_path: Path):
    hostile_tree(tmp_path / "t0")
    ref = push_trees(registry, tmp_path, "optout", [tmp_path / "t0"])
    m = open_mounter(ref, "--rootfs-allow-suid-dev", rootfs=True)
    assert m.rootfs is not None
    assert not {"nosuid", "nodev", "noexec"} & mount_options(str(m.rootfs))
    assert as_nobody(f"{m.rootfs}/bin/id", "-u").stdout.strip() == "0"
    help_text = lazyerofs("mount", "--help").stdout
    assert "--rootfs-allow-suid-dev" in help_text and "container runtime" in help_text


def test_a_run_dir_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY_UID, NOBODY_UID)
    monkeypatch.setattr(mount_state, "RUN_DIR", run)
    with pytest.raises(MountError, match="owned by uid 65534"):
        mount_state.save_state(str(tmp_path / "mnt"), {"pid": 1})
    assert not list(run.iterdir())


# --- medium: the FUSE tree is root's unless --allow-other ---------------------------


def test_a_local_user_cannot_read_the_fuse_tree_by_default(open_mounter: Mounter, plain_image: str):
    m = open_mounter(plain_image)
    for path in (m.layer(0), m.dir / "manifest.json"):
        got = as_nobody("cat", str(path))
        assert got.returncode != 0 and "Permission denied" in got.stderr, (path, got)
    assert m.layer(0).read_bytes()[1024:1028] == b"\xe2\xe1\xf5\xe0"  # root still reads
    assert "--allow-other" in lazyerofs("mount", "--help").stdout
    opened = open_mounter(plain_image, "--allow-other")
    got = as_nobody("cat", str(opened.dir / "manifest.json"))
    assert got.returncode == 0 and "layers" in got.stdout


# --- medium: umount touches only its own mount and its own daemon -------------------


def test_umount_does_not_signal_a_process_that_reused_the_daemons_pid(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root for /run/lazyerofs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"])
    state = mount_state.state_dir(str(mnt))
    try:
        started = start_time(sleeper.pid)
        state.mkdir(parents=True, mode=0o700)
        # The daemon that wrote this started earlier; its pid now names `sleep`.
        (state / "state.json").write_text(
            json.dumps({"pid": sleeper.pid, "start_time": started - 100, "mountpoint": str(mnt), "rootfs": None, "kernel_mounts": []})
        )
        lazyerofs("umount", str(mnt), check=False)
        time.sleep(0.3)
        assert sleeper.poll() is None, "umount killed an unrelated process"
        assert not state.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(state, ignore_errors=True)


HELLO_FS = """
import sys, errno, stat, pyfuse3, trio

class Hello(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        return a

pyfuse3.init(Hello(), sys.argv[1], {"fsname=otherfs"})
print("ready", flush=True)
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=True)
"""


def test_umount_refuses_a_fuse_mount_that_is_not_lazyerofs(tmp_path: Path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    mnt = tmp_path / "other"
    mnt.mkdir()
    script = tmp_path / "hello.py"
    script.write_text(HELLO_FS)
    proc = subprocess.Popen([sys.executable, str(script), str(mnt)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert kmount.find_mount(str(mnt)) is not None
        out = lazyerofs("umount", str(mnt), check=False)
        assert out.returncode == 1
        assert "not a lazyerofs mount" in out.stderr
        assert kmount.find_mount(str(mnt)) == ("fuse", "otherfs")
        assert proc.poll() is None
        os.stat(mnt)  # the connection was not aborted: it still answers
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        proc.terminate()
        proc.wait(10)


def _daemon_pid(*paths: Path) -> int:
    for p in mount_state.RUN_DIR.glob("*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            s = json.loads(p.read_text())
            if s.get("mountpoint") in {str(x) for x in paths}:
                return s["pid"]
    raise AssertionError(f"no state for {paths}")


@pytest.mark.parametrize("mount_via", ["symlink", "real"])
def test_a_mount_is_found_by_its_real_path_and_through_a_symlink(plain_image: str, tmp_path: Path, mount_via: str):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    mount_at, umount_at = (link, real) if mount_via == "symlink" else (real, link)
    pid = None
    try:
        lazyerofs("mount", plain_image, str(mount_at), "--cache-dir", str(tmp_path / "cache"))
        pid = _daemon_pid(real, link)
        assert (link / "layers" / "0" / "digest").exists()
        lazyerofs("umount", str(umount_at))
        assert kmount.find_mount(str(real)) is None
        assert wait_gone(pid), "the daemon outlived umount"
        assert not mount_state.state_dir(str(real)).exists()
        assert not (mount_state.RUN_DIR / hashlib.sha256(str(link).encode()).hexdigest()[:16]).exists()
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        force_cleanup(real, None)


# --- medium: no secrets in world-readable files -------------------------------------


def test_state_and_log_are_private_and_hold_no_url_secrets(mounter: Mounter, module_registry, plain_image: str, tmp_path: Path):
    manifest = json.loads(
        subprocess.run(
            ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
             f"http://{module_registry.host}/v2/test/plainimg/manifests/v1"],
            capture_output=True, check=True,
        ).stdout
    )
    desc = manifest["layers"][0]
    desc_file = tmp_path / "d.json"
    desc_file.write_text(json.dumps(desc))
    url = f"http://alice:hunter2pass@{module_registry.host}/v2/test/plainimg/blobs/{desc['digest']}?sig=SECRETSIG&x=1"
    m = mounter(url, "--descriptor", str(desc_file))
    assert m.layer(0).read_bytes()[:4096]  # some requests, so some log lines
    state_file = mount_state.state_dir(str(m.dir)) / "state.json"
    state = json.loads(state_file.read_text())
    log_file = Path(state["log"])
    for path in (state_file, log_file):
        text = path.read_text()
        assert "SECRETSIG" not in text and "hunter2pass" not in text, (path, text[-2000:])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert state["ref"] == f"http://{module_registry.host}/v2/test/plainimg/blobs/{desc['digest']}"


# --- warnings reach the terminal ------------------------------------------------------


def test_warnings_of_the_daemon_before_readiness_reach_the_mount_commands_stderr(mounter: Mounter, registry):
    raw = bytes(range(256)) * 1024
    blob = make_blob(raw, 65536)
    del blob.descriptor["annotations"]["dev.containerd.erofs.zstd.chunk_digest"]
    ref = push_blobs(registry, "warned", [(blob.data, blob.descriptor)])
    m = mounter(ref, "--insecure-skip-verify")
    forwarded = [line for line in m.stderr.splitlines() if line.startswith("lazyerofs: warning: ")]
    assert any("layer 0" in line for line in forwarded), m.stderr
    assert m.layer(0).read_bytes() == raw


# --- low: nonsense refused with a clear message -----------------------------------------


def test_mount_over_a_non_empty_directory_is_refused_unless_nonempty(mounter: Mounter, plain_image: str, tmp_path: Path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("x")
    try:
        out = lazyerofs("mount", plain_image, str(busy), "--cache-dir", str(tmp_path / "c"), check=False)
        assert out.returncode == 1 and "not empty" in out.stderr and "--nonempty" in out.stderr
        assert kmount.find_mount(str(busy)) is None
        lazyerofs("mount", plain_image, str(busy), "--cache-dir", str(tmp_path / "c"), "--nonempty")
        assert (busy / "manifest.json").exists()
        lazyerofs("umount", str(busy))
    finally:
        force_cleanup(busy, None)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_rootfs_equal_to_or_inside_the_mount_dir_is_refused(plain_image: str, tmp_path: Path, where: str):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rootfs = mnt if where == "same" else mnt / "rootfs"
    rootfs.mkdir(exist_ok=True)
    try:
        out = lazyerofs("mount", plain_image, str(mnt), "--rootfs", str(rootfs), check=False, timeout=60)
        assert out.returncode == 1 and "--rootfs" in out.stderr and "contain" in out.stderr
        assert kmount.find_mount(str(mnt)) is None and kmount.find_mount(str(rootfs)) is None
    finally:
        force_cleanup(mnt, rootfs)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_read_timeout_that_is_not_positive_is_a_usage_error(value: str, tmp_path: Path):
    out = lazyerofs("mount", "example.com/x:1", str(tmp_path), f"--read-timeout={value}", check=False)
    assert out.returncode == 2
    assert "--read-timeout" in out.stderr and "positive number of seconds" in out.stderr
    assert "Traceback" not in out.stderr


def test_mount_and_umount_as_non_root_say_root_is_needed(open_tmp: Path):
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to become nobody")
    mnt = open_tmp / "mnt"
    mnt.mkdir()
    os.chown(mnt, NOBODY_UID, NOBODY_UID)
    out = as_nobody(LAZYEROFS, "mount", "127.0.0.1:9/x:1", str(mnt))
    assert out.returncode == 1
    assert "needs root" in out.stderr and "Traceback" not in out.stderr
    assert kmount.find_mount(str(mnt)) is None
    out = as_nobody(LAZYEROFS, "umount", str(mnt))
    assert out.returncode == 1
    assert "needs root" in out.stderr and "Traceback" not in out.stderr


def test_stats_into_a_closed_pipe_exits_quietly(mounter: Mounter, plain_image: str):
    m = mounter(plain_image)
    read_end, write_end = os.pipe()
    os.close(read_end)  # what `| head -c1` leaves once head has exited
    try:
        proc = subprocess.run(
            [LAZYEROFS, "stats", str(m.dir)], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode in (1, 141)
