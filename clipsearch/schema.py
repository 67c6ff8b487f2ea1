"""The catalog's tables as SQLAlchemy 2.x typed declarative models.

These are the schema the Alembic revisions in `migrations/` build (a test compares the two) and
the terms the catalog's writes are expressed in. They live apart from `catalog` because
importing SQLAlchemy's ORM costs about 0.35 s of CPU: a query, or a re-run that finds nothing
to write, only reads, in plain SQL, and never imports this module.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, CheckConstraint, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from clipsearch.records import STATUSES


class Base(DeclarativeBase):
    # Named constraints let Alembic's batch mode rebuild SQLite tables without guessing.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "pk": "pk_%(table_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        }
    )


class Image(Base):
    """One file seen by the indexer; its vector, if indexed, lives in `Vector`.

    Vectors are kept out of this table so that the indexer's diff scans ~100 bytes a row
    instead of ~1 KiB: at 100k files that is the difference between 10 MB and 110 MB read.
    """

    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in STATUSES)})", name="status"),
        # Ids are never reused, so an id from a FAISS file that is a moment out of date can only
        # miss, never name another file.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[bytes | None] = mapped_column(LargeBinary, index=True)
    width: Mapped[int | None]
    height: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16), index=True)
    error: Mapped[str | None] = mapped_column(Text)
    indexed_at: Mapped[float | None] = mapped_column(Float)  # unix time of the last encode attempt
    # The catalog generation that last set or dropped one of this row's vectors (NULL: before
    # revision 0003): what each model's FAISS file must take in to catch up with the catalog.
    vector_generation: Mapped[int | None] = mapped_column(Integer, index=True)
    # What the file says about itself (`records.PhotoMeta`, revision 0005); `metadata_version`
    # names the reader that filled them in, NULL where none has yet.
    format: Mapped[str | None] = mapped_column(String(16))
    extension: Mapped[str | None] = mapped_column(String(16))  # of the file name, lower case (`extension_of`)
    orientation: Mapped[int | None]
    taken: Mapped[str | None] = mapped_column(String(19), index=True)  # local time, ISO 8601
    taken_offset: Mapped[int | None]  # minutes east of UTC
    camera_make: Mapped[str | None] = mapped_column(Text)
    camera_model: Mapped[str | None] = mapped_column(Text)
    lens: Mapped[str | None] = mapped_column(Text)
    latitude: Mapped[float | None] = mapped_column(Float, index=True)
    longitude: Mapped[float | None] = mapped_column(Float)
    metadata_version: Mapped[int | None]


class Model(Base):
    """A model that has encoded images into this catalog. A row appears with the first vector
    committed, so a run that failed before encoding anything leaves no trace of its model."""

    __tablename__ = "models"
    __table_args__ = ({"sqlite_autoincrement": True},)  # a dropped model's id is never reused

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)  # registry name or checkpoint path
    dim: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    # A fingerprint of the weights that made its vectors ("sha256:<hex>", `weights_fingerprint`;
    # revision 0006): a name can stand for other weights later. NULL: unknown, adopted by the next run.
    weights: Mapped[str | None] = mapped_column(Text)


class Vector(Base):
    """An image's embedding by one model. Only rows with status "indexed" have any; an image
    whose content changed keeps only the vector of the model that re-encoded it, and those of
    other rows holding the same content (`Catalog.commit_batch`)."""

    __tablename__ = "vectors"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True, index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian float16 [dim]


class Meta(Base):
    """Index-wide settings: catalog_id, default_model, generation, created_at, clipsearch_version, ..."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
