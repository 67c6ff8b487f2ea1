"""Which weights made a model's vectors: `models.weights`, a fingerprint of the weights files
(`clipsearch.clip.sources.weights_fingerprint`). Vectors are recorded by the model's name, and
the weights behind a name can change (a retrained checkpoint at the same path, a new bundled
demo); with the fingerprint, `index` re-encodes vectors of other weights and a search refuses
to mix the two spaces.

Rows from before this revision get NULL (unknown: the next `index` run adopts the current
weights), except "demo": every catalog written before this revision holds vectors by an
earlier bundled demo, whose fingerprint is recorded so that the retrained one re-encodes them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The SHA-256 of the demo's model.safetensors before it was retrained, as
# `weights_fingerprint` writes it (written out: a revision must not change with the code).
LEGACY_DEMO_WEIGHTS = "sha256:0fcb52190b1412d309266fc574223c318985bc56c5baca040c482f7272d87657"


def upgrade() -> None:
    op.add_column("models", sa.Column("weights", sa.Text(), nullable=True))
    op.get_bind().execute(
        sa.text("UPDATE models SET weights = :weights WHERE name = 'demo'"), {"weights": LEGACY_DEMO_WEIGHTS}
    )


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("weights")
