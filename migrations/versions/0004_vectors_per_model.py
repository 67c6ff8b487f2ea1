"""Vectors per model: the catalog of files no longer depends on the model.

A `models` table names each model that has encoded images; `vectors` is keyed by (image, model).
An existing catalog's vectors become its recorded model's (nothing is re-encoded), and that
model becomes the home's default. A model recorded in `meta` with no vector (a first run that
failed before encoding anything) is forgotten. Every catalog gets a random `catalog_id`, which
each FAISS file records so that a file from another catalog is never trusted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

import secrets
import time

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", name=op.f("uq_models_name")),
        sqlite_autoincrement=True,
    )
    conn = op.get_bind()
    meta: dict[str, str] = {row[0]: row[1] for row in conn.execute(sa.text("SELECT key, value FROM meta"))}
    # float16 vectors: two bytes a dimension
    dim = conn.execute(sa.text("SELECT length(vector) / 2 FROM vectors LIMIT 1")).scalar()
    if dim is not None:
        name = meta.get("model") or "ViT-B/32"  # what clipsearch recorded for an index opened without --model
        conn.execute(
            sa.text("INSERT INTO models (id, name, dim, created_at) VALUES (1, :name, :dim, :now)"),
            {"name": name, "dim": dim, "now": time.time()},
        )
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('default_model', :name)"), {"name": name})
    op.create_table(
        "vectors_by_model",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_vectors_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_id"], ["models.id"], name=op.f("fk_vectors_model_id_models"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", "model_id", name=op.f("pk_vectors")),
    )
    op.execute("INSERT INTO vectors_by_model (image_id, model_id, vector) SELECT image_id, 1, vector FROM vectors")
    op.drop_table("vectors")
    op.rename_table("vectors_by_model", "vectors")
    op.create_index(op.f("ix_vectors_model_id"), "vectors", ["model_id"], unique=False)
    op.execute("DELETE FROM meta WHERE key IN ('model', 'dim')")
    conn.execute(
        sa.text("INSERT OR REPLACE INTO meta (key, value) VALUES ('catalog_id', :id)"), {"id": secrets.token_hex(16)}
    )


def downgrade() -> None:
    """Back to one model's vectors: the default model's, with the others dropped."""
    conn = op.get_bind()
    default = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'default_model'")).scalar()
    model = conn.execute(sa.text("SELECT id, dim FROM models WHERE name = :name"), {"name": default}).fetchone()
    op.create_table(
        "vectors_one_model",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_vectors_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("image_id", name=op.f("pk_vectors")),
    )
    if model is not None:
        conn.execute(
            sa.text("INSERT INTO vectors_one_model SELECT image_id, vector FROM vectors WHERE model_id = :id"),
            {"id": model[0]},
        )
        conn.execute(
            sa.text("INSERT OR REPLACE INTO meta (key, value) VALUES ('model', :name), ('dim', :dim)"),
            {"name": default, "dim": str(model[1])},
        )
    # Indexed rows without the default model's vector cannot stay "indexed" in the old schema.
    op.execute(
        "UPDATE images SET error = NULL, status = 'missing' WHERE status = 'indexed' AND id NOT IN (SELECT image_id FROM vectors_one_model)"
    )
    op.drop_index(op.f("ix_vectors_model_id"), table_name="vectors")
    op.drop_table("vectors")
    op.rename_table("vectors_one_model", "vectors")
    op.drop_table("models")
    op.execute("DELETE FROM meta WHERE key IN ('default_model', 'catalog_id')")
