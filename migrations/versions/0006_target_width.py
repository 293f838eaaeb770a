"""plans.target and profiles.target widened to 32 characters: "compressed-tensors" (the vLLM
target, a scheme per module) is 18; the 10 of 0005 held "native" and "gguf" only.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 23:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('plans', 'profiles'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('target', existing_type=sa.String(length=10),
                                  type_=sa.String(length=32), existing_nullable=False,
                                  existing_server_default='native')


def downgrade() -> None:
    for table in ('profiles', 'plans'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column('target', existing_type=sa.String(length=32),
                                  type_=sa.String(length=10), existing_nullable=False,
                                  existing_server_default='native')
