"""A real PostgreSQL server for tests: Debian's ``postgresql`` package, started on a free port.

``PostgresServer.start()`` runs ``initdb`` into a fresh directory and ``postgres`` on a free
loopback port (as the ``postgres`` user when the tests run as root: PostgreSQL refuses to run as
root). Each test gets a database of its own (:meth:`PostgresServer.create_database`). When the
binaries are missing the PostgreSQL tests skip, except where ``CI=true`` or
``RLHF_REQUIRE_POSTGRES=1``: there they fail, so CI never passes without having run them.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Debian installs the server binaries outside PATH, one directory per major version.
SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
START_TIMEOUT_S = 60.0


def find_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (RLHF_POSTGRES_BIN, Debian's, PATH)."""
    explicit = os.environ.get("RLHF_POSTGRES_BIN")
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob(SEARCH[0]), reverse=True) + list(SEARCH[1:])
    for directory in candidates:
        if directory and (Path(directory) / "initdb").exists():
            return Path(directory)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def require_binaries() -> Path:
    binaries = find_binaries()
    if binaries is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        if os.environ.get("CI", "").lower() == "true" or os.environ.get("RLHF_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    return binaries


class PostgresServer:
    """A throwaway PostgreSQL cluster (no durability settings: tests only)."""

    def __init__(self, binaries: Path, port: int) -> None:
        self.binaries = binaries
        self.port = port
        self.directory = Path(tempfile.mkdtemp(prefix="rlhf-postgres-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.running = False
        self._names = itertools.count()
        as_root = os.geteuid() == 0
        self.user = "postgres" if as_root else os.environ.get("USER", "postgres")
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            shutil.chown(self.directory, "postgres")

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        """A plain libpq URL, as a user would write RLHF_DATABASE_URL."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self, durable: bool = False) -> PostgresServer:
        """``durable``: PostgreSQL's own defaults (fsync, synchronous_commit), as a benchmark
        must run it; otherwise the tests' fast settings, which give up durability."""
        initdb = [str(self.binaries / "initdb"), "-D", str(self.data), "-U", self.user]
        subprocess.run(
            [*self._prefix, *initdb, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            "max_connections": "200",
        }
        if not durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        options = " ".join(f"-c {key}={value}" for key, value in settings.items())
        pg_ctl = [str(self.binaries / "pg_ctl"), "-D", str(self.data), "-l", str(self.log)]
        started = subprocess.run(
            [*self._prefix, *pg_ctl, "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)), "start"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.running = True
        if started.returncode != 0:
            raise RuntimeError(f"postgres did not start:\n{self._log_tail()}")
        self._wait_ready()
        return self

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.admin_url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start:\n{self._log_tail()}") from None
                time.sleep(0.1)

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.running:
            pg_ctl = [str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", "immediate"]
            subprocess.run([*self._prefix, *pg_ctl, "stop"], capture_output=True, check=False)
            self.running = False
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)
