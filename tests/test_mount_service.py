"""``lazyerofs service``: mounts handed to a pre-imported process.

Real service processes (``lazyerofs service start``, each on a private
socket under the test's tmp dir, so no other test's mount goes through
it), a real registry and real mounts. Each test says what it pins down;
timings are the benchmark's (``benchmarks/mount_time.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.mount import LAZYEROFS, Mounted, Mounter, lazyerofs, make_tree

from lazyfs.cli import service as client
from lazyfs.mount import service as server
from lazyfs.mount import state as mount_state
from lazyfs.produce.mkfs import make_erofs

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent


class Service:
    """One ``lazyerofs service`` on a private socket; stopped (or killed) at the end."""

    def __init__(self, sock: Path) -> None:
        self.socket = sock
        self.env = {**os.environ, client.SOCKET_ENV: str(sock)}
        self.env.pop(client.DISABLE_ENV, None)
        self.pid: int | None = None

    def cli(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return lazyerofs(*args, check=check, env=kw.pop("env", self.env), **kw)

    def start(self) -> None:
        self.cli("service", "start")
        self.pid = self.status()["pid"]

    def status(self) -> dict:
        out = self.cli("service", "status", "--json", check=False)
        assert out.returncode in (0, 3), out.stderr
        return json.loads(out.stdout)

    def stop(self) -> None:
        self.cli("service", "stop", check=False, timeout=60)
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A running service; ``lazyerofs`` run by this test (``mounter`` too) talks to it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    svc = Service(tmp_path / "svc" / "service.sock")
    monkeypatch.setenv(client.SOCKET_ENV, str(svc.socket))
    monkeypatch.delenv(client.DISABLE_ENV, raising=False)
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def small_image(module_registry, tmp_path_factory) -> tuple[str, list[bytes]]:
    """A two-layer image in the registry and the raw bytes of its layers."""
    tmp = tmp_path_factory.mktemp("small")
    images = []
    for i in range(2):
        make_tree(tmp / f"tree{i}", i, big=200_000)
        make_erofs(tmp / f"tree{i}", tmp / f"layer{i}.erofs")
        images.append(tmp / f"layer{i}.erofs")
    ref = f"{module_registry.host}/test/service:v1"
    lazyerofs("push", "--chunk-size", "64KiB", *map(str, images), ref)
    return ref, [p.read_bytes() for p in images]


def alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet is not: the service's parent
    exited, so init reaps it, maybe late)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def service_sockets_held(pid: int, sock: Path) -> list[str]:
    """The sockets of ``pid`` that belong to the service at ``sock`` (its
    listener, or a connection it accepted: /proc/net/unix names both by path)."""
    ours = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:] if line.endswith(str(sock))}
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in ours:
                held.append(target)
    return held


def layer_digests(m) -> list[str]:
    return [hashlib.sha256(m.layer(i).read_bytes()).hexdigest() for i in range(2)]


# ----------------------------------------------------------- life of the service


def test_service_start_status_stop_and_the_socket_is_private(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    svc = Service(tmp_path / "run" / "service.sock")
    try:
        assert svc.cli("service", "status", check=False).returncode == 3  # not running
        svc.start()
        st = svc.status()
        assert st["running"] is True and st["current"] is True and st["served"] == 0
        assert st["uid"] == 0 and alive(st["pid"])
        assert oct(svc.socket.parent.stat().st_mode & 0o777) == "0o700"
        assert oct(svc.socket.stat().st_mode & 0o777) == "0o600"
        # A second start finds it running and leaves it be.
        svc.cli("service", "start")
        assert svc.status()["pid"] == st["pid"]
        svc.cli("service", "stop")
        assert not alive(st["pid"])
        assert not svc.socket.exists()
        assert svc.status() == {"running": False, "socket": str(svc.socket)}
    finally:
        svc.stop()


def test_help_says_what_the_service_costs_and_that_foreground_mounts_stay_in_process():
    text = lazyerofs("service", "--help").stdout
    for words in ("0.3 s", "40 MB", "root", "uid", "in-process", "mount -f"):
        assert words in text, words
    assert "--no-service" in lazyerofs("mount", "--help").stdout


# ------------------------------------------------------------- mounts through it


def test_a_mount_through_the_service_is_byte_identical_and_outlives_the_service(
    service: Service, mounter: Mounter, small_image
):
    ref, raws = small_image
    via = mounter(ref, rootfs=True)
    assert service.status()["served"] == 1  # the service's child made this mount
    direct = mounter(ref, "--no-service", cache_dir=mounter.tmp / "cache2")
    assert service.status()["served"] == 1  # --no-service: made in-process
    assert layer_digests(via) == layer_digests(direct) == [hashlib.sha256(r).hexdigest() for r in raws]
    assert (via.rootfs / "etc" / "layer1.conf").read_text() == "layer = 1\n"
    # The startup timeline starts at the client's command, not at the fork.
    startup = via.stats()["startup"]
    assert startup["steps"]["command"] > 0 and startup["start"] < time.monotonic()

    daemon = json.loads((mount_state.state_dir(str(via.dir)) / "state.json").read_text())["pid"]
    assert service_sockets_held(daemon, service.socket) == []  # the daemon holds none of the service's sockets
    service.cli("service", "stop")
    assert not alive(service.pid)
    assert alive(daemon)  # the mount's daemon lives on
    assert layer_digests(via)[0] == hashlib.sha256(raws[0]).hexdigest()
    lazyerofs("umount", str(via.dir))
    assert not mount_state.state_dir(str(via.dir)).exists()


def test_a_child_takes_on_the_callers_directory_umask_and_environment(service: Service, mounter: Mounter, small_image):
    """A relative mount point resolves in the caller's cwd; the environment
    (here LAZYEROFS_RUN_DIR, read at import by lazyfs.mount.state) is the
    caller's, not the service's."""
    ref, _ = small_image
    work = mounter.tmp / "work"
    (work / "rel").mkdir(parents=True)
    run_dir = mounter.tmp / "rundir"
    env = {**service.env, "LAZYEROFS_RUN_DIR": str(run_dir)}
    m = mounter.mounted
    mounted = Mounted(work / "rel", mounter.tmp / "cache")
    m.append(mounted)
    try:
        out = subprocess.run(
            [LAZYEROFS, "mount", ref, "rel", "--cache-dir", str(mounted.cache_dir)],
            cwd=work, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert service.status()["served"] == 1
        states = list(run_dir.glob("*/state.json"))
        assert len(states) == 1 and json.loads(states[0].read_text())["mountpoint"] == str(work / "rel")
        assert (work / "rel" / "manifest.json").exists()
    finally:
        subprocess.run([LAZYEROFS, "umount", str(work / "rel")], env=env, capture_output=True, timeout=60)


def test_several_mounts_at_once_through_one_service(service: Service, mounter: Mounter, small_image):
    ref, raws = small_image
    dirs = []
    procs = []
    for i in range(3):
        d = mounter.tmp / f"many{i}"
        d.mkdir()
        mounter.mounted.append(Mounted(d, mounter.tmp / f"cache-many{i}"))
        dirs.append(d)
        procs.append(subprocess.Popen(
            [LAZYEROFS, "mount", ref, str(d), "--cache-dir", str(mounter.tmp / f"cache-many{i}")],
            env=service.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert service.status()["served"] == 3
    for d in dirs:
        assert (d / "layers" / "1" / "layer.erofs").read_bytes() == raws[1]
    assert service.status()["children"] == []  # every child reaped


def test_an_error_comes_back_as_rc_1_with_the_message_on_the_callers_stderr(
    service: Service, mounter: Mounter, module_registry
):
    m = mounter(f"{module_registry.host}/test/no-such-image:v1", expect_failure=True)
    assert "lazyerofs: error:" in m.stderr and "no-such-image" in m.stderr
    assert service.status()["served"] == 1
    # An argument error too (argparse's exit status 2, its usage on stderr).
    out = service.cli("mount", "--no-such-option", "x", "y", check=False)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr
    assert service.status()["served"] == 2


@pytest.fixture
def hanging_mount(service: Service, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Callable[[], None]]]:
    """A mount through the service against a registry that accepts and
    never answers: (the client, the service's child running it, a function
    killing the child and its daemon), once the child runs. All is killed
    at the end."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ref = f"127.0.0.1:{silent.getsockname()[1]}/test/hang:v1"
    proc = subprocess.Popen(
        [LAZYEROFS, "mount", ref, str(mnt), "--cache-dir", str(tmp_path / "cache")],
        env=service.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not service.status()["children"]:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        child = service.status()["children"][0]
        started.append(child)
        time.sleep(0.3)  # the child forks the mount's daemon
        with contextlib.suppress(OSError):
            started += [int(p) for p in Path(f"/proc/{child}/task/{child}/children").read_text().split()]

        def kill_started() -> None:
            for pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        yield proc, child, kill_started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_started()
        silent.close()
        lazyerofs("umount", str(mnt), check=False, timeout=60)


def test_ctrl_c_on_the_client_reaches_the_child(hanging_mount):
    """SIGINT to the waiting client interrupts the child's mount (rc 130), as in-process."""
    proc, child, _ = hanging_mount
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert wait_dead(child)


def test_a_service_dying_after_it_took_the_request_is_an_error_not_a_second_mount(
    hanging_mount, service: Service
):
    """The child may still mount: the client says so and returns 1 rather
    than mount again in-process (which here would hang on the registry)."""
    proc, child, kill_started = hanging_mount
    os.kill(service.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == 1
    assert alive(child)  # the request it took is still being served (it holds the client's stderr)
    kill_started()
    _, err = proc.communicate(timeout=30)
    assert "service went away during the mount" in err


def test_a_service_stops_when_its_own_code_changes_on_disk(tmp_path: Path):
    """A client of the edited tree is refused, and the service, seeing its
    own files changed, exits 75 (systemd's Restart=on-failure starts the new code)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    copy = tmp_path / "checkout"
    for pkg in ("lazyfs", "cache"):
        shutil.copytree(REPO_ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    sock = tmp_path / "svc" / "service.sock"
    env = {**os.environ, "PYTHONPATH": str(copy), client.SOCKET_ENV: str(sock)}
    env.pop(client.DISABLE_ENV, None)
    cmd = [sys.executable, "-m", "lazyfs.cli"]
    svc = subprocess.Popen([*cmd, "service", "run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([*cmd, "service", "status"], env=env, cwd=tmp_path, capture_output=True).returncode:
            assert time.monotonic() < deadline and svc.poll() is None
            time.sleep(0.05)
        target = copy / "lazyfs" / "units.py"
        target.write_text(target.read_text() + "\n")
        out = subprocess.run(
            [*cmd, "mount", "x/y:z", str(tmp_path)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 1  # mounted in-process: a bad reference
        assert svc.wait(30) == server.EXIT_STALE
        assert not sock.exists()
    finally:
        if svc.poll() is None:
            svc.kill()
        svc.communicate()


# ------------------------------------------------------------------ fallbacks


def test_a_client_running_other_code_mounts_in_process(service: Service, mounter: Mounter, small_image, tmp_path: Path):
    """Another checkout (a copy of the tree on PYTHONPATH) has another
    fingerprint: the service refuses it and the client mounts itself."""
    ref, raws = small_image
    copy = tmp_path / "checkout"
    for pkg in ("lazyfs", "cache"):
        shutil.copytree(REPO_ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**service.env, "PYTHONPATH": str(copy)}
    # Run from outside the repo: `python -m`/`-c` put the cwd first on sys.path.
    probe = subprocess.run(
        [sys.executable, "-c", "import lazyfs; print(lazyfs.__file__)"], env=env, capture_output=True, text=True,
        cwd=tmp_path,
    )  # fmt: skip
    assert probe.stdout.strip() == str(copy / "lazyfs" / "__init__.py")
    mnt = mounter.tmp / "other"
    mnt.mkdir()
    mounter.mounted.append(Mounted(mnt, mounter.tmp / "cache"))
    out = subprocess.run(
        [sys.executable, "-m", "lazyfs.cli", "mount", ref, str(mnt), "--cache-dir", str(mounter.tmp / "cache")],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    st = service.status()
    assert st["served"] == 0 and st["refusals"] == 1
    assert (mnt / "layers" / "0" / "layer.erofs").read_bytes() == raws[0]


def test_a_killed_service_leaves_a_stale_socket_and_clients_mount_in_process(
    service: Service, mounter: Mounter, small_image
):
    ref, raws = small_image
    os.kill(service.pid, signal.SIGKILL)
    assert wait_dead(service.pid)
    assert service.socket.exists()  # stale: nobody listens
    m = mounter(ref)
    assert m.layer(0).read_bytes() == raws[0]
    assert service.status()["running"] is False
    # A new start replaces the stale socket.
    service.start()
    assert service.status()["running"] is True


@pytest.fixture
def open_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A service whose socket other users can reach (modes opened up on purpose)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    top = Path(tempfile.mkdtemp(prefix="lazyerofs-svc-"))
    svc = Service(top / "svc" / "service.sock")
    monkeypatch.setenv(client.SOCKET_ENV, str(svc.socket))
    try:
        svc.start()
        for p in (top, svc.socket.parent):
            p.chmod(0o755)
        svc.socket.chmod(0o666)
        yield svc
    finally:
        svc.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_a_peer_of_another_uid_is_refused(open_service: Service, tmp_path: Path):
    """The socket reachable, it still serves nobody but its own uid: status
    and mount requests from uid nobody are refused."""
    service = open_service
    code = (
        "import json, sys\n"
        "from lazyfs.cli import service as s\n"
        "try:\n"
        "    s.request({'op': 'status'}, sys.argv[1])\n"
        "except s.ServiceRefused as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", code,
         str(service.socket)],
        capture_output=True, text=True, timeout=60, cwd="/", env={**service.env, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert "refused:" in out.stdout and "uid 65534" in out.stdout, out.stdout + out.stderr
    # The real command as nobody: refused, so it mounts in-process and fails there (not root).
    out = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", LAZYEROFS, "mount", "x/y:z", "/"],
        capture_output=True, text=True, timeout=60, cwd="/", env=service.env,
    )  # fmt: skip
    assert out.returncode == 1
    st = service.status()
    assert st["served"] == 0 and st["refusals"] == 2


def test_the_uid_check_refuses_another_uid_and_passes_our_own():
    me = server.Peer(os.getpid(), os.getuid(), os.getgid())
    assert server.check_peer(me) is None
    assert "uid 65534" in (server.check_peer(server.Peer(os.getpid(), 65534, 65534)) or "")


def test_foreground_help_and_no_service_mounts_never_go_to_the_service():
    wants = client._wants_service
    assert wants(["mount", "r", "/d"])
    assert wants(["mount", "r", "/d", "--rootfs", "/x", "--no-profile"])
    for extra in (["-f"], ["--foreground"], ["--fore"], ["--no-service"], ["-h"], ["--help"]):
        assert not wants(["mount", "r", "/d", *extra]), extra


def test_the_fingerprint_changes_with_a_source_file(tmp_path: Path):
    copy = tmp_path / "checkout"
    for pkg in ("lazyfs", "cache"):
        shutil.copytree(REPO_ROOT / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from lazyfs.cli.service import fingerprint; import hashlib; print(hashlib.sha256(fingerprint().encode()).hexdigest())"

    def fp() -> str:
        env = {**os.environ, "PYTHONPATH": str(copy)}
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path
        ).stdout

    before = fp()
    assert fp() == before
    target = copy / "cache" / "__init__.py"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 1_000_000_000))
    assert fp() != before
