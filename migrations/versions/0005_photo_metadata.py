"""What each photo says about itself: date taken (local time and UTC offset), camera, lens, GPS
position, EXIF orientation and file format (and its name's extension, for `--ext`), for filters, sorting and choosing which of two
duplicates to keep. Dates and latitudes are indexed: a date range or a place narrows the rows
by its index.

Rows from before this revision get NULL `metadata_version`: the next `index` run reads their
headers (no image is decoded or re-encoded) and fills the columns in.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

import os

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

COLUMNS = (
    ("format", sa.String(16)),
    ("extension", sa.String(16)),
    ("orientation", sa.Integer()),
    ("taken", sa.String(19)),
    ("taken_offset", sa.Integer()),
    ("camera_make", sa.Text()),
    ("camera_model", sa.Text()),
    ("lens", sa.Text()),
    ("latitude", sa.Float()),
    ("longitude", sa.Float()),
    ("metadata_version", sa.Integer()),
)


def upgrade() -> None:
    for name, kind in COLUMNS:
        op.add_column("images", sa.Column(name, kind, nullable=True))
    # The extension comes from the path, known already: filled in here, for every row, as
    # clipsearch.records.extension_of does (written out: a revision must not change with it).
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, path FROM images")).fetchall()
    update = sa.text("UPDATE images SET extension = :extension WHERE id = :id")
    for start in range(0, len(rows), 10_000):
        conn.execute(update, [{"id": i, "extension": extension_of(path)} for i, path in rows[start : start + 10_000]])
    op.create_index(op.f("ix_images_taken"), "images", ["taken"], unique=False)
    op.create_index(op.f("ix_images_latitude"), "images", ["latitude"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_index(batch.f("ix_images_taken"))
        batch.drop_index(batch.f("ix_images_latitude"))
        for name, _ in COLUMNS:
            batch.drop_column(name)


def extension_of(path: bytes) -> str | None:
    ext = os.path.splitext(os.path.basename(path))[1][1:].lower()
    return os.fsdecode(ext) if 0 < len(ext) <= 16 else None
