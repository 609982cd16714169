"""Projects: each one's label config, and the sealed Label Studio credentials it came with.

Label configs are stored once per content hash and shared by projects and annotations; a config
nothing refers to any more is collected. Tokens and webhook secrets are stored sealed
(``rlhf_core.vault``): this module keeps their columns, never their plaintext.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, and_, case, delete, exists, func, select, update

from rlhf_core.db import Database, db_now, upsert
from rlhf_core.schema import annotations_table, label_configs, projects

logger = logging.getLogger(__name__)

# Writes of annotations, projects and label configs take this lock on PostgreSQL (SQLite's write
# lock does the same): a config is never collected while a concurrent write starts using it, and
# the change counter orders every write.
CONTENT_LOCK = ("store content",)


@dataclass(frozen=True)
class Project:
    project_id: int
    label_config: str
    hostname: str | None  # the Label Studio URL the token came with
    token_sealed: str | None  # encrypted (rlhf_core.vault); None when not stored
    webhook_secret_sealed: str | None  # None for a project never connected through /setup
    model_version: str | None


def config_hash(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()[:16]


class ProjectStore:
    """The ``projects`` and ``label_configs`` tables of ``self.db``."""

    db: Database

    def upsert_project(self, project_id: int, label_config: str) -> None:
        """Remember a project's label config (from a webhook event: no credentials)."""
        with self.db.write() as conn:
            self.db.lock(conn, *CONTENT_LOCK)
            old = _stored_config_hash(conn, project_id)
            digest = put_config(self.db, conn, label_config)
            statement = upsert(self.db, projects).values(
                project_id=project_id, config_hash=digest, updated_at=db_now()
            )
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[projects.c.project_id],
                    set_={
                        "config_hash": statement.excluded.config_hash,
                        "updated_at": statement.excluded.updated_at,
                    },
                )
            )
            _collect_replaced_config(conn, old, digest)

    def connect_project(
        self,
        project_id: int,
        label_config: str,
        hostname: str | None,
        token_sealed: str | None,
        new_webhook_secret_sealed: str,
    ) -> None:
        """/setup: the label config, and the Label Studio host with the token that came with it.

        A token stays bound to the host it came with: a token replaces the stored pair (its host
        None when none came with it); a host without a token never moves the stored token to
        that host (it is recorded only while no token is stored). ``new_webhook_secret_sealed``
        is kept only when the project has no webhook secret yet.
        """
        with self.db.write() as conn:
            self.db.lock(conn, *CONTENT_LOCK)
            old = _stored_config_hash(conn, project_id)
            digest = put_config(self.db, conn, label_config)
            statement = upsert(self.db, projects).values(
                project_id=project_id,
                config_hash=digest,
                hostname=hostname,
                token_sealed=token_sealed,
                webhook_secret_sealed=new_webhook_secret_sealed,
                updated_at=db_now(),
            )
            new = statement.excluded
            # Every SET expression reads the row as it was before this statement.
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[projects.c.project_id],
                    set_={
                        "config_hash": new.config_hash,
                        "hostname": case(
                            (new.token_sealed.is_not(None), new.hostname),
                            (
                                projects.c.token_sealed.is_(None),
                                func.coalesce(new.hostname, projects.c.hostname),
                            ),
                            else_=projects.c.hostname,
                        ),
                        "token_sealed": func.coalesce(new.token_sealed, projects.c.token_sealed),
                        "webhook_secret_sealed": func.coalesce(
                            projects.c.webhook_secret_sealed, new.webhook_secret_sealed
                        ),
                        "updated_at": new.updated_at,
                    },
                )
            )
            _collect_replaced_config(conn, old, digest)

    def replace_webhook_secret(self, project_id: int, sealed: str) -> None:
        """A new secret for a project whose stored one the current key cannot open."""
        with self.db.write() as conn:
            conn.execute(
                update(projects)
                .where(projects.c.project_id == project_id)
                .values(webhook_secret_sealed=sealed)
            )

    def project(self, project_id: int) -> Project | None:
        query = (
            select(projects, label_configs.c.xml)
            .join(label_configs, label_configs.c.config_hash == projects.c.config_hash)
            .where(projects.c.project_id == project_id)
        )
        with self.db.read() as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Project(
            project_id=row["project_id"],
            label_config=row["xml"],
            hostname=row["hostname"],
            token_sealed=row["token_sealed"],
            webhook_secret_sealed=row["webhook_secret_sealed"],
            model_version=row["model_version"],
        )

    def project_ids(self) -> list[int]:
        with self.db.read() as conn:
            return list(
                conn.execute(select(projects.c.project_id).order_by(projects.c.project_id))
                .scalars()
                .all()
            )

    def set_project_model_version(self, project_id: int, model_version: str) -> None:
        with self.db.write() as conn:
            conn.execute(
                update(projects)
                .where(projects.c.project_id == project_id)
                .values(model_version=model_version)
            )

    def model_versions(self) -> dict[int, str]:
        with self.db.read() as conn:
            rows = conn.execute(
                select(projects.c.project_id, projects.c.model_version).where(
                    projects.c.model_version.is_not(None)
                )
            )
            return {row[0]: row[1] for row in rows}

    def seal_plaintext_tokens(self, seal: Callable[[str], str | None]) -> int:
        """Encrypt the Label Studio tokens an early version stored in plaintext (None from
        ``seal`` drops a token); returns how many. The plaintext leaves the files too
        (:meth:`~rlhf_core.db.Database.erasing_write`)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(projects.c.project_id, projects.c.access_token).where(
                    projects.c.access_token.is_not(None)
                )
            ).all()
        if not rows:
            return 0
        with self.db.erasing_write() as conn:
            for project_id, token in rows:
                conn.execute(
                    update(projects)
                    .where(projects.c.project_id == project_id)
                    .values(token_sealed=seal(token), access_token=None)
                )
        logger.info(
            "encrypted the Label Studio tokens of %d projects stored in plaintext", len(rows)
        )
        return len(rows)


def _stored_config_hash(conn: Connection, project_id: int) -> str | None:
    return conn.execute(
        select(projects.c.config_hash).where(projects.c.project_id == project_id)
    ).scalar()


def put_config(db: Database, conn: Connection, xml: str) -> str:
    """Store a label config (once per content); returns its hash."""
    digest = config_hash(xml)
    conn.execute(
        upsert(db, label_configs).values(config_hash=digest, xml=xml).on_conflict_do_nothing()
    )
    return digest


def _collect_replaced_config(conn: Connection, old: str | None, new: str) -> None:
    """Drop the project's previous config once nothing refers to it any more."""
    if old is not None and old != new:
        collect_config(conn, old)


def collect_config(conn: Connection, digest: str) -> None:
    """Drop a label config no project and no annotation refers to any more."""
    conn.execute(
        delete(label_configs).where(
            and_(
                label_configs.c.config_hash == digest,
                ~exists().where(projects.c.config_hash == digest),
                ~exists().where(annotations_table.c.config_hash == digest),
            )
        )
    )
