"""plans.target and profiles.target: what a plan is served by ("native", the CALDERA format,
or "gguf", a llama.cpp type per tensor); a model has one profile per target. Rows from before
read "native"; a stored gguf profile (its config names the target) is marked on the way up.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-22 10:00:00.000000
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.String(length=10), nullable=False,
                                      server_default='native'))
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.String(length=10), nullable=False,
                                      server_default='native'))
    # the config dict says "target" only for a gguf profile (ProfileConfig.to_dict)
    conn = op.get_bind()
    profiles = sa.table('profiles', sa.column('id', sa.String), sa.column('config', sa.JSON),
                        sa.column('target', sa.String))
    gguf = []
    for pid, config in conn.execute(sa.select(profiles.c.id, profiles.c.config)):
        if isinstance(config, str):   # a JSON column read back as text
            config = json.loads(config)
        if isinstance(config, dict) and config.get('target') == 'gguf':
            gguf.append(pid)
    if gguf:
        conn.execute(profiles.update().where(profiles.c.id.in_(gguf)).values(target='gguf'))


def downgrade() -> None:
    with op.batch_alter_table('profiles', schema=None) as batch_op:
        batch_op.drop_column('target')
    with op.batch_alter_table('plans', schema=None) as batch_op:
        batch_op.drop_column('target')
