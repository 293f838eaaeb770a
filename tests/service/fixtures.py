"""Service test fixtures: a private Postgres DATABASE per test session (created and dropped
here), SQLite files, a private Redis key prefix, a tiny safetensors model under a model root,
and apps with teams and keys. Shared by tests/service and tests/workers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from service.db.session import dispose_all

REPO = Path(__file__).resolve().parents[2]


def create_pg_database(base_url: str, prefix: str = "bitplan_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(make_url(base_url).set(database="postgres"),
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    dispose_all()
    u = make_url(url)
    admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def fresh_pg_url(postgres_url) -> Iterator[str]:
    """An empty Postgres database for this one test."""
    url = create_pg_database(postgres_url)
    try:
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(scope="session")
def pg_url(postgres_url) -> Iterator[str]:
    """A Postgres database migrated to head, private to this test session."""
    from service.db.migrate import upgrade

    url = create_pg_database(postgres_url)
    try:
        upgrade(url)
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    from service.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'bitplan.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request) -> str:
    """Run the test on both databases (each migrated to head)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-root")


WORDS = ("def return self import if else for in the None class = ( ) : . , [ ] is not and "
         "or from as with try except raise while True False lambda yield pass").split()


def write_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer (a few dozen Python words, the rest <unk>): no training, and it
    encodes the calibration split ~10x faster than a byte-level one. Enough for a random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>",
                            pad_token="<|endoftext|>").save_pretrained(path)


def write_tiny_model(path: Path, layers: int = 2, seed: int = 0, tokenizer: bool = True,
                     nan_in: str | None = None) -> Path:
    """A real (random) Qwen2 causal LM in safetensors: config, weights (a few hundred KB) and a
    word-level tokenizer. `nan_in` poisons one linear's weights with a NaN."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=264, hidden_size=32, intermediate_size=72,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    # Re-materialise every parameter on the CPU from our own generator: transformers'
    # from_pretrained patches nn.Module.register_parameter process-wide while it loads, so a
    # model built while a background worker thread loads one can come out on the meta device.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.data = torch.ones(p.shape)
            elif p.dim() == 1:
                p.data = torch.zeros(p.shape)
            else:
                p.data = torch.randn(p.shape, generator=gen) * 0.02
    if nan_in:
        with torch.no_grad():
            dict(model.named_modules())[nan_in].weight[0, 0] = float("nan")
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        write_word_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(model_root) -> Path:
    return write_tiny_model(model_root / "tiny-qwen")


@pytest.fixture(scope="session")
def tiny_nan_model(model_root) -> Path:
    return write_tiny_model(model_root / "tiny-nan", nan_in="model.layers.0.self_attn.q_proj")


# Small enough that profiling the tiny model takes seconds (part of the profile key).
TINY_PROFILE = {"calib_seqs": 4, "probe_seqs": 2, "seq_len": 64, "q_bits": [2, 4, 8],
                "anchors": [[3, 0.5]],
                "decomposition": {"outer_iters": 1, "lr_iters": 1, "hadamard": False}}
# The demo model's e2e: the same sparse grid on the real model, a small calibration set.
DEMO_PROFILE = TINY_PROFILE


def synthetic_profile(n_blocks: int = 3, key: str | None = None, model_ref: str = "tiny"):
    """A profile built from numbers (no model run): a known error law per linear, in the fitted
    error model's real serialised form, and samples drawn from it."""
    import json
    import math

    from compressor.profile_store import LinearProfile, Profile
    from solver.errormodel import ErrorModel

    linears, params = [], 0
    for b in range(n_blocks):
        for kind, (m, n) in {"self_attn.q_proj": (32, 32), "mlp.down_proj": (32, 72)}.items():
            alpha = 1.0 + b * 0.5 + (0.3 if "mlp" in kind else 0.0)
            em = ErrorModel(theta=(math.log(0.01), -math.log(4), 0.05), c=0.1,
                            tail_ranks=[0, 4, 8, 16], tail=[1.0, 0.6, 0.4, 0.25], r2_fit=0.99)
            samples = [[bits, rank, float(em.predict(bits, rank))]
                       for bits in (2, 3, 4, 6, 8) for rank in (0, 8)]
            linears.append(LinearProfile(
                name=f"model.layers.{b}.{kind}", block=b, out_features=m, in_features=n,
                alpha=alpha, proxy=alpha / 2, samples=samples,
                fit=json.loads(json.dumps(em.to_dict()))))   # as stored: lists, not tuples
            params += m * n
    return Profile(key=key or uuid.uuid4().hex[:32], model_ref=model_ref,
                   weights_hash="w" * 64, calib_hash="c" * 16, config={"grid": "sparse"},
                   fixed_bytes=12345, linears=linears,
                   block_sensitivity=[1.0, 0.5, 2.0, 1.5][:n_blocks],
                   block_proxy=[0.1, 0.2, 0.3, 0.4][:n_blocks],
                   stats={"fit_r2_mean": 0.99, "linear_params": params,
                          "fp16_bytes": 2 * params + 12345})


def make_settings(tmp: Path, db_url: str, *, redis_url: str | None = None,
                  model_roots: list[Path] | None = None, **extra):
    from service.settings import Settings

    return Settings(data_dir=tmp, database_url=db_url, redis_url=redis_url,
                    model_roots=model_roots or [], redis_prefix=f"bitplan-test-{uuid.uuid4().hex}:",
                    **extra)


class RecordingQueue:
    """Records what the API enqueues, for tests of the API alone (the queue has its own)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def enqueue(self, task_name: str, job_id: str) -> None:
        self.sent.append((task_name, job_id))

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class ApiEnv:
    client: object
    settings: object
    db: object
    keys: dict[str, str]          # team name -> bearer key
    queue: object

    def h(self, team: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}


def make_env(settings, queue=None, teams=("alpha", "beta")) -> ApiEnv:
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.db.auth import create_key, create_team
    from service.db.session import get_database

    db = get_database(settings.resolved_database_url)
    keys = {}
    with db.session() as s:
        for name in teams:
            team = create_team(s, f"{name}-{uuid.uuid4().hex[:6]}")
            keys[name] = create_key(s, team)[1]
    app = create_app(settings, queue=queue)
    client = TestClient(app, raise_server_exceptions=False)
    return ApiEnv(client, settings, db, keys, app.state.queue)
