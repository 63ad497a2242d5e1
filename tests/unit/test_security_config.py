"""Who the app runs as, which directories and pidfiles are trusted, and the runtime directory.

Other users are simulated as root: directories and files chowned to `nobody`, processes started
with subprocess's user=. Those tests are skipped when not run as root.
"""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgi_engine.config import settings
from fcgi_engine.config.settings import GROUP_NEEDS_USER, IdentityError, run_as
from fcgi_engine.system import pidfile as pidfiles
from fcgi_engine.system import sockets
from tests.conftest import wait_for

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another user needs root")


@pytest.fixture
def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def make_dir(path: Path, mode: int, uid: int = -1) -> Path:
    path.mkdir()
    os.chmod(path, mode)  # not subject to the umask
    if uid >= 0:
        os.chown(path, uid, -1)
    return path


# ---------------------------------------------------------------- user and group


@as_root
def test_run_as_root_switches_with_initgroups_semantics(nobody: pwd.struct_passwd) -> None:
    identity = run_as("nobody", None)
    assert identity is not None
    assert (identity.user, identity.uid, identity.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert identity.home == nobody.pw_dir
    assert set(identity.groups) == set(os.getgrouplist("nobody", nobody.pw_gid))
    # user: root keeps uid 0 but still takes the configured group.
    import grp

    group = grp.getgrgid(nobody.pw_gid).gr_name
    kept = run_as("root", group)
    assert kept is not None and (kept.uid, kept.gid) == (0, nobody.pw_gid)


def test_run_as_refuses_a_group_without_a_user() -> None:
    assert run_as(None, None) is None
    with pytest.raises(IdentityError, match="group: needs user:"):
        run_as(None, "nogroup")
    assert "write user: root to keep root" in GROUP_NEEDS_USER


def test_run_as_refuses_an_unknown_user_or_group() -> None:
    with pytest.raises(IdentityError, match="no such user 'no-such-user-xyz'"):
        run_as("no-such-user-xyz", None)
    with pytest.raises(IdentityError, match="no such group 'no-such-group-xyz'"):
        run_as("root", "no-such-group-xyz")


def test_not_root_cannot_run_the_app_as_someone_else(
    monkeypatch: pytest.MonkeyPatch, nobody: pwd.struct_passwd
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(IdentityError, match="only root can switch users, and this runs as uid"):
        run_as("nobody", None)
    # Naming ourselves is fine: nothing to switch.
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    assert run_as("nobody", None) is None
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    with pytest.raises(IdentityError, match="only root can switch groups"):
        run_as("nobody", "root")


# ---------------------------------------------------------------- runtime directory


def test_default_runtime_dir_is_private_to_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert settings.default_runtime_dir() == "/run/fcgi-engine"
    assert settings.default_pidfile("my app") == "/run/fcgi-engine/my_app.pid"
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert settings.default_runtime_dir() == "/run/user/1234/fcgi-engine"
    # Without a runtime directory of our own: one per uid in /tmp, never a shared name.
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert settings.default_runtime_dir() == "/tmp/fcgi-engine-1234"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert settings.default_runtime_dir() == "/tmp/fcgi-engine-1234"


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Make tmp_path/rt our default runtime directory."""
    path = tmp_path / "rt"
    monkeypatch.setattr(pidfiles, "default_runtime_dir", lambda: str(path))
    yield path


def test_runtime_dir_is_created_0755_whatever_the_umask(runtime_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        pidfiles.ensure_pidfile_directory(str(runtime_dir / "a.pid"))
    finally:
        os.umask(old)
    st = runtime_dir.stat()
    assert (st.st_mode & 0o7777, st.st_uid) == (0o755, os.geteuid())
    pidfiles.ensure_pidfile_directory(str(runtime_dir / "a.pid"))  # ours: accepted again


def test_runtime_dir_writable_by_group_is_refused(runtime_dir: Path) -> None:
    make_dir(runtime_dir, 0o775)
    with pytest.raises(pidfiles.UnsafeDirectory, match=r"writable by other users \(mode 0775\)"):
        pidfiles.ensure_pidfile_directory(str(runtime_dir / "a.pid"))
    assert "mode 0775" in (pidfiles.pidfile_directory_problem(str(runtime_dir / "a.pid")) or "")


@as_root
def test_runtime_dir_of_another_user_is_refused(
    runtime_dir: Path, nobody: pwd.struct_passwd
) -> None:
    make_dir(runtime_dir, 0o755, nobody.pw_uid)
    with pytest.raises(pidfiles.UnsafeDirectory) as info:
        pidfiles.ensure_pidfile_directory(str(runtime_dir / "a.pid"))
    assert str(runtime_dir) in str(info.value) and "belongs to nobody" in str(info.value)


# ---------------------------------------------------------------- directories


def test_our_own_directories_are_trusted(tmp_path: Path) -> None:
    assert pidfiles.directory_problem(str(make_dir(tmp_path / "ours", 0o755))) is None
    # Missing directories are judged by their existing parents.
    assert pidfiles.directory_problem(str(tmp_path / "missing" / "deeper")) is None
    # A sticky world-writable directory (like /tmp): others cannot replace what is ours.
    assert pidfiles.directory_problem(str(make_dir(tmp_path / "sticky", 0o1777))) is None


def test_world_writable_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    path = make_dir(tmp_path / "open", 0o777)
    problem = pidfiles.directory_problem(str(path))
    assert problem == f"{path} is writable by every user and not sticky (mode 0777)"
    with pytest.raises(pidfiles.UnsafeDirectory, match="refusing the pidfile directory"):
        pidfiles.check_directory(str(path), "pidfile")
    # Below it too: whoever can rename the parent can swap the child.
    child = make_dir(path / "child", 0o755)
    assert f"{path} (a parent of {child})" in (pidfiles.directory_problem(str(child)) or "")


@as_root
@pytest.mark.parametrize("mode", [0o777, 0o775, 0o755])
def test_directory_of_another_user_is_refused(
    tmp_path: Path, nobody: pwd.struct_passwd, mode: int
) -> None:
    # Its owner can plant or replace files whatever the mode says (and chmod it anyway).
    path = make_dir(tmp_path / "theirs", mode, nobody.pw_uid)
    problem = pidfiles.directory_problem(str(path))
    assert problem and "belongs to nobody" in problem


@as_root
def test_ensure_pidfile_directory_refuses_before_creating_anything(
    tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    shared = make_dir(tmp_path / "shared", 0o777, nobody.pw_uid)
    with pytest.raises(pidfiles.UnsafeDirectory):
        pidfiles.ensure_pidfile_directory(str(shared / "sub" / "a.pid"))
    assert not (shared / "sub").exists()


# ---------------------------------------------------------------- pidfiles


@as_root
def test_pidfile_owner_is_read_with_the_pid(tmp_path: Path, nobody: pwd.struct_passwd) -> None:
    path = tmp_path / "a.pid"
    pidfiles.write_pidfile(str(path), 12345)
    assert pidfiles.read_pidfile_owner(str(path)) == (12345, 0)
    os.chown(path, nobody.pw_uid, -1)
    assert pidfiles.read_pidfile_owner(str(path)) == (12345, nobody.pw_uid)
    assert not pidfiles.trusted_owner(nobody.pw_uid) and pidfiles.trusted_owner(0)
    assert pidfiles.read_pidfile_owner(str(tmp_path / "none.pid")) == (None, None)


@pytest.fixture
def fake_master(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A process of `nobody` whose command line names fcgi-engine and tmp_path/x.pid."""
    pidfile = tmp_path / "x.pid"
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 60; :", "fcgi-engine", "--pidfile", str(pidfile)], user="nobody"
    )
    try:
        wait_for(
            lambda: str(pidfile) in (pidfiles.process_cmdline(proc.pid) or []),
            5,
            what="the fake master's command line",
        )
        yield proc, pidfile
    finally:
        proc.kill()
        proc.wait()


@as_root
def test_another_users_process_is_never_our_master(
    fake_master: tuple[subprocess.Popen[bytes], Path], nobody: pwd.struct_passwd
) -> None:
    proc, pidfile = fake_master
    assert pidfiles.process_uids(proc.pid) == (nobody.pw_uid,) * 4
    # Its command line matches, but the pidfile is root's and the process nobody's.
    pidfiles.write_pidfile(str(pidfile), proc.pid)
    assert not pidfiles.is_our_master(proc.pid, str(pidfile))
    assert not pidfiles.is_our_master(proc.pid, str(pidfile), owner=0)
    # The same process for a pidfile of its own user (our caller then refuses the pidfile).
    assert pidfiles.is_our_master(proc.pid, str(pidfile), owner=nobody.pw_uid)


# ---------------------------------------------------------------- unix sockets


def test_bind_unix_refuses_a_world_writable_directory(tmp_path: Path) -> None:
    path = make_dir(tmp_path / "open", 0o777) / "app.sock"
    with pytest.raises(pidfiles.UnsafeDirectory, match="refusing the socket directory"):
        sockets.bind_unix(str(path))
    assert not path.exists()


def test_bind_unix_in_a_sticky_directory_creates_our_own_socket(tmp_path: Path) -> None:
    path = make_dir(tmp_path / "sticky", 0o1777) / "app.sock"
    with sockets.bind_unix(str(path), 0o600):
        st = path.lstat()
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o600)


@as_root
def test_bind_unix_leaves_another_users_socket_file_alone(
    tmp_path: Path, nobody: pwd.struct_passwd
) -> None:
    path = make_dir(tmp_path / "sticky", 0o1777) / "app.sock"
    with socket.socket(socket.AF_UNIX) as planted:
        planted.bind(str(path))
    os.chown(path, nobody.pw_uid, -1)  # a stale socket file of another user
    with pytest.raises(sockets.SocketInUse, match="socket file of nobody"):
        sockets.bind_unix(str(path))
    assert path.lstat().st_uid == nobody.pw_uid
    # Our own user's stale socket (here: the app's user we chown sockets to) is replaced.
    with sockets.bind_unix(str(path), owner=(nobody.pw_uid, nobody.pw_gid)):
        assert path.lstat().st_uid == nobody.pw_uid
