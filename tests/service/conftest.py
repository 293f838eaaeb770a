from tests.service.fixtures import (  # noqa: F401
    db_url,
    fresh_pg_url,
    model_root,
    pg_url,
    sqlite_url,
    tiny_model,
    tiny_nan_model,
)
