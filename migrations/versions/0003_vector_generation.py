"""Record in which catalog generation each row's vector last changed, so the FAISS file can be
brought up to date by the rows that changed instead of rebuilt from every vector.

Rows from before this revision get NULL, and `changes_logged_since` records the generation at
which the record begins: a FAISS file older than that cannot be updated, only rebuilt.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("vector_generation", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_images_vector_generation"), "images", ["vector_generation"], unique=False)
    op.execute(
        "INSERT OR REPLACE INTO meta (key, value) "
        "SELECT 'changes_logged_since', COALESCE((SELECT value FROM meta WHERE key = 'generation'), '0')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM meta WHERE key = 'changes_logged_since'")
    with op.batch_alter_table("images") as batch:
        batch.drop_index(batch.f("ix_images_vector_generation"))
        batch.drop_column("vector_generation")
