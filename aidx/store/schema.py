"""Tables of the store (SQLAlchemy Core): the index of received patients, studies, series and
instances, the study jobs and the export outbox. Every file path is recorded relative to the
storage root (:mod:`aidx.store.paths`)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)

from .paths import StoredPath, StoredPathList

metadata = MetaData()

patients = Table(
    "patients",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patient_key", String(160), nullable=False, unique=True),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False),
    Column("patient_name", String(324)),
    Column("birth_date", String(8)),
    Column("sex", String(16)),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    Column("patient_pk", ForeignKey("patients.id"), nullable=False),
    Column("accession_number", String(64)),
    Column("study_date", String(8)),
    Column("study_time", String(16)),
    Column("description", String(64)),
    Column("calling_ae", String(16), nullable=False),
    # receiving -> complete; a late instance makes a complete study "updated" until it settles.
    Column("state", String(16), nullable=False),
    Column("version", Integer, nullable=False, default=0),  # completions so far
    Column("quiet_period_s", Float, nullable=False),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("bytes", Integer, nullable=False, default=0),
    Column("first_arrival", Float, nullable=False),
    Column("last_arrival", Float, nullable=False),
    Column("completed_at", Float),
    Index("ix_studies_state", "state"),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("modality", String(16)),
    Column("description", String(64)),
    Column("body_part", String(16)),
    Column("series_number", Integer),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("bytes", Integer, nullable=False, default=0),
    Column("first_arrival", Float, nullable=False),
    Column("last_arrival", Float, nullable=False),
)

instances = Table(
    "instances",
    metadata,
    Column("sop_uid", String(64), primary_key=True),
    Column("series_uid", ForeignKey("series.series_uid"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("transfer_syntax", String(64), nullable=False),
    Column("instance_number", Integer),
    Column("path", StoredPath, nullable=False),
    Column("size", Integer, nullable=False),
    Column("calling_ae", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
)

# One job per completed study version (the assembler records it; workers run it).
# queued -> running -> results_ready -> sent (every destination acknowledged), or failed (with
# the reason) or not_applicable (no eligible series, with the reason); superseded when a later
# version of the study completed before this one finished.
jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", ForeignKey("studies.study_uid"), nullable=False, index=True),
    Column("study_version", Integer, nullable=False),
    Column("state", String(24), nullable=False),
    Column("reason", Text),
    Column("priority", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(128)),  # host:pid:n of the worker that holds it
    Column("lease_until", Float),  # a running job whose lease ran out is taken again
    Column("model", String(160)),  # name@version that produced the results
    Column("series_uid", String(64)),
    Column("result_dir", StoredPath),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("inference_s", Float),
    UniqueConstraint("study_uid", "study_version", name="uq_job_study_version"),
    Index("ix_jobs_claim", "state", "priority", "created_at"),
)

# The results of a job: one row per (study, series, model version, study version), so a job run
# again after a crash replaces its row and reuses its SOP Instance UIDs.
results = Table(
    "results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("series_uid", String(64), nullable=False),
    Column("model", String(160), nullable=False),
    Column("study_version", Integer, nullable=False),
    Column("findings_path", StoredPath, nullable=False),
    Column("sr_path", StoredPath, nullable=False),
    Column("sr_sop_uid", String(64), nullable=False),
    Column("seg_path", StoredPath),
    Column("finding_count", Integer, nullable=False),
    Column("max_probability", Float),
    Column("created_at", Float, nullable=False),
    # Schema version 3: a challenger's result in shadow mode (aidx.store.shadow): stored, never
    # sent, never on a radiologist's worklist.
    Column("shadow", Boolean, nullable=False, default=False, server_default=false()),
    UniqueConstraint("study_uid", "series_uid", "model", "study_version", name="uq_result"),
)

# Schema version 3: shadow runs (aidx.store.shadow). A challenger model (``aidx models shadow``)
# runs on a study after the champion's job finished, when no live job waits: one row per (job,
# challenger); queued -> running -> done, or failed / not_applicable with the reason. Its results
# are ``results`` rows of the champion's job with ``shadow`` set.
shadow_runs = Table(
    "shadow_runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", ForeignKey("jobs.id"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("study_version", Integer, nullable=False),
    Column("model", String(160), nullable=False),  # the challenger, name@version
    Column("state", String(24), nullable=False),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("worker", String(128)),
    Column("lease_until", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("inference_s", Float),
    UniqueConstraint("job_id", "model", name="uq_shadow_run"),
    Index("ix_shadow_runs_claim", "state", "created_at"),
)

# The per-study timeline (append-only): what happened to a study and when.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("job_id", Integer),
    Column("event", String(40), nullable=False),
    Column("at", Float, nullable=False),
    Column("detail", Text),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("destination", String(64), nullable=False),
    Column("item_key", String(200), nullable=False),
    Column("study_uid", String(64)),
    Column("series_uid", String(64)),
    Column("job_id", Integer),  # the job whose results these are, if any
    Column("files", StoredPathList, nullable=False),  # JSON list of paths
    # pending -> sending -> sent; pending -> failed after the last attempt
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("sent_at", Float),
    UniqueConstraint("destination", "item_key", name="uq_outbox_item"),
    Index("ix_outbox_due", "state", "next_attempt_at"),
)

# Review-app accounts (issue 7). Passwords are kept only as salted scrypt hashes (ui.accounts).
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("display_name", String(200), nullable=False),
    Column("organisation", String(200), nullable=False, default=""),
    Column("role", String(16), nullable=False),
    Column("password_hash", String(255), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("language", String(8), nullable=False, default="en"),  # interface language
    Column("created_at", Float, nullable=False),
    Column("password_changed_at", Float, nullable=False),
    Column("failed_logins", Integer, nullable=False, default=0),  # consecutive; reset by a login
    Column("locked_until", Float),
    CheckConstraint("role IN ('radiologist', 'engineer', 'admin')", name="ck_users_role"),
    CheckConstraint("language IN ('en', 'zh')", name="ck_users_language"),
)

# Review-app sessions: only the SHA-256 of a token is stored, so a copy of the store does not
# let anyone in.
sessions = Table(
    "sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # hex SHA-256 of the token
    Column("user_id", ForeignKey("users.id"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # absolute lifetime; idle timeout on last_seen
    Column("revoked", Boolean, nullable=False, default=False),
)

# Who did what and when in the review app (append-only: the code has no update or delete).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("username", String(64), nullable=False),
    Column("role", String(16)),
    Column("action", String(40), nullable=False),
    Column("study_uid", String(64)),
    Column("detail", Text),  # JSON object
    Column("client", String(128)),  # the client's address
    Index("ix_audit_log_at", "at"),
    Index("ix_audit_log_user_at", "username", "at"),
)

# Radiologist review of one AI result (issue 7): new -> in_review -> signed; re-opening a signed
# review for an amendment puts it back in_review (sign_count says how many signed SRs exist).
reviews = Table(
    "reviews",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("result_id", ForeignKey("results.id"), nullable=False, unique=True),
    Column("study_uid", String(64), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("opened_at", Float),  # first opened by a reviewer
    Column("updated_at", Float, nullable=False),
    Column("signed_by", String(64)),
    Column("signed_at", Float),
    Column("signed_sr_uid", String(64)),  # the latest signed SR
    Column("signed_sr_path", StoredPath),
    Column("sign_count", Integer, nullable=False, default=0),
    CheckConstraint("state IN ('new', 'in_review', 'signed')", name="ck_reviews_state"),
)

# Every decision on a finding (append-only; the latest row per (review, finding_key) counts).
# finding_key: "ai-<finding id>" for the model's findings, "added-<n>" for a radiologist's.
decisions = Table(
    "decisions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("review_id", ForeignKey("reviews.id"), nullable=False, index=True),
    Column("finding_key", String(24), nullable=False),
    Column("action", String(16), nullable=False),
    Column("reason", Text),
    Column("diameter_mm", Float),
    Column("center_x", Float),
    Column("center_y", Float),
    Column("center_z", Float),
    Column("username", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("at", Float, nullable=False),
    CheckConstraint(
        "action IN ('accept', 'reject', 'edit', 'add', 'remove', 'reset')", name="ck_decisions"
    ),
    # Schema version 2 (aidx.store.migrations): a review's latest decision per finding, and the
    # feedback export's decisions since a time.
    Index("ix_decisions_review_key", "review_id", "finding_key", "id"),
    Index("ix_decisions_at", "at"),
)
