"""initial schema: teams, keys, models, shared profiles (+ per-linear records), jobs, plans,
artifacts

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 23:31:09.451578
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('ref', sa.String(length=1000), nullable=False),
    sa.Column('path', sa.String(length=4096), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('weights_hash', sa.String(length=128), nullable=True),
    sa.Column('num_linears', sa.Integer(), nullable=False),
    sa.Column('linear_params', sa.BigInteger(), nullable=False),
    sa.Column('kept_bytes', sa.BigInteger(), nullable=False),
    sa.Column('inventory', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models')),
    sa.UniqueConstraint('fingerprint', name=op.f('uq_models_fingerprint'))
    )
    op.create_table('teams',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_teams')),
    sa.UniqueConstraint('name', name=op.f('uq_teams_name'))
    )
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('team_id', sa.String(length=32), nullable=False),
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('salt', sa.String(length=64), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_api_keys_team_id_teams'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_id', name=op.f('uq_api_keys_key_id'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_team_id'), ['team_id'], unique=False)

    op.create_table('profiles',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=32), nullable=True),
    sa.Column('model_ref', sa.String(length=1000), nullable=True),
    sa.Column('weights_hash', sa.String(length=128), nullable=True),
    sa.Column('calib_hash', sa.String(length=128), nullable=True),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('fixed_bytes', sa.BigInteger(), nullable=False),
    sa.Column('linear_order', sa.JSON(), nullable=False),
    sa.Column('block_sensitivity', sa.JSON(), nullable=False),
    sa.Column('block_proxy', sa.JSON(), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('complete', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_profiles_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_profiles')),
    sa.UniqueConstraint('key', name=op.f('uq_profiles_key'))
    )
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_profiles_model_id'), ['model_id'], unique=False)

    op.create_table('error_models',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('profile_id', sa.String(length=32), nullable=False),
    sa.Column('linear', sa.String(length=500), nullable=False),
    sa.Column('fit', sa.JSON(), nullable=False),
    sa.Column('r2', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_error_models_profile_id_profiles'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_error_models')),
    sa.UniqueConstraint('profile_id', 'linear', name=op.f('uq_error_models_profile_id_linear'))
    )
    op.create_table('error_samples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('profile_id', sa.String(length=32), nullable=False),
    sa.Column('linear', sa.String(length=500), nullable=False),
    sa.Column('samples', sa.JSON(), nullable=False),
    sa.Column('n_samples', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_error_samples_profile_id_profiles'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_error_samples')),
    sa.UniqueConstraint('profile_id', 'linear', name=op.f('uq_error_samples_profile_id_linear'))
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('team_id', sa.String(length=32), nullable=True),
    sa.Column('created_by_team', sa.String(length=32), nullable=True),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('stage', sa.String(length=100), nullable=False),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('error_code', sa.String(length=50), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=True),
    sa.Column('dedup_key', sa.String(length=200), nullable=True),
    sa.Column('depends_on', sa.String(length=32), nullable=True),
    sa.Column('model_id', sa.String(length=32), nullable=True),
    sa.Column('profile_id', sa.String(length=32), nullable=True),
    sa.Column('plan_id', sa.String(length=32), nullable=True),
    sa.Column('artifact_id', sa.String(length=32), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('history', sa.JSON(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['depends_on'], ['jobs.id'], name=op.f('fk_jobs_depends_on_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_jobs_profile_id_profiles'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_jobs_team_id_teams'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('dedup_key', name=op.f('uq_jobs_dedup_key')),
    sa.UniqueConstraint('team_id', 'idempotency_key', name=op.f('uq_jobs_team_id_idempotency_key'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_depends_on'), ['depends_on'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_plan_id'), ['plan_id'], unique=False)
        batch_op.create_index('ix_jobs_status_updated', ['status', 'updated_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_team_id'), ['team_id'], unique=False)

    op.create_table('linear_sensitivities',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('profile_id', sa.String(length=32), nullable=False),
    sa.Column('linear', sa.String(length=500), nullable=False),
    sa.Column('block', sa.Integer(), nullable=True),
    sa.Column('out_features', sa.Integer(), nullable=False),
    sa.Column('in_features', sa.Integer(), nullable=False),
    sa.Column('alpha', sa.Float(), nullable=False),
    sa.Column('proxy', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_linear_sensitivities_profile_id_profiles'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_linear_sensitivities')),
    sa.UniqueConstraint('profile_id', 'linear', name=op.f('uq_linear_sensitivities_profile_id_linear'))
    )
    op.create_table('plans',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('team_id', sa.String(length=32), nullable=False),
    sa.Column('model_id', sa.String(length=32), nullable=False),
    sa.Column('profile_id', sa.String(length=32), nullable=True),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('budget', sa.String(length=100), nullable=False),
    sa.Column('method', sa.String(length=20), nullable=False),
    sa.Column('constraints', sa.JSON(), nullable=False),
    sa.Column('compress', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('budget_bytes', sa.BigInteger(), nullable=True),
    sa.Column('total_bytes', sa.BigInteger(), nullable=True),
    sa.Column('predicted_error', sa.Float(), nullable=True),
    sa.Column('optimality_gap', sa.Float(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('solved_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_plans_model_id_models')),
    sa.ForeignKeyConstraint(['profile_id'], ['profiles.id'], name=op.f('fk_plans_profile_id_profiles'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_plans_team_id_teams'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_plans'))
    )
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_plans_team_id'), ['team_id'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('team_id', sa.String(length=32), nullable=False),
    sa.Column('plan_id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('path', sa.String(length=4096), nullable=True),
    sa.Column('bytes', sa.BigInteger(), nullable=True),
    sa.Column('tensor_bytes', sa.BigInteger(), nullable=True),
    sa.Column('sha256', sa.String(length=64), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['plan_id'], ['plans.id'], name=op.f('fk_artifacts_plan_id_plans'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['team_id'], ['teams.id'], name=op.f('fk_artifacts_team_id_teams'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
    sa.UniqueConstraint('plan_id', name=op.f('uq_artifacts_plan_id'))
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_team_id'), ['team_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_team_id'))

    op.drop_table('artifacts')
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_plans_team_id'))

    op.drop_table('plans')
    op.drop_table('linear_sensitivities')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_team_id'))
        batch_op.drop_index('ix_jobs_status_updated')
        batch_op.drop_index(batch_op.f('ix_jobs_plan_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_depends_on'))

    op.drop_table('jobs')
    op.drop_table('error_samples')
    op.drop_table('error_models')
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_profiles_model_id'))

    op.drop_table('profiles')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_team_id'))

    op.drop_table('api_keys')
    op.drop_table('teams')
    op.drop_table('models')
