"""The API accepts, validates and lists plans without importing torch or transformers, and a
burst of concurrent first requests for a model never fails."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import REPO

FRESH_API = """
import sys
from pathlib import Path

from service.db.migrate import upgrade
from service.db.profile_store import DbProfileStore
from tests.helpers.api import make_env, make_settings, RecordingQueue
from tests.helpers.profiles import synthetic_profile

tmp, root = Path(sys.argv[1]), Path(sys.argv[2])
url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
upgrade(url)
env = make_env(make_settings(tmp, url, model_roots=[root]), queue=RecordingQueue())
body = {"model": "tiny-qwen", "budget": "0.9x", "constraints": {"max_bits": {"*q_proj": 4}}}
r = env.client.post("/v1/plans", json=body, headers=env.h("alpha"))
assert r.status_code == 202, r.text
bad = env.client.post("/v1/plans", json=body | {"budget": "lots"}, headers=env.h("alpha"))
assert bad.status_code == 422, bad.text
models = env.client.get("/v1/models", headers=env.h("alpha"))
assert models.status_code == 200 and models.json()[0]["num_linears"] == 15, models.text
# with a profile in the store, budgets are checked by the solver's problem: still no torch
store = DbProfileStore(env.db)
prof = synthetic_profile(n_blocks=2)
store.put(prof)
store.link_model(prof.key, models.json()[0]["id"])
r2 = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.9x"},
                     headers=env.h("beta"))
assert r2.status_code == 202, r2.text
plans = env.client.get("/v1/plans", headers=env.h("alpha"))
assert plans.status_code == 200 and len(plans.json()) == 1, plans.text
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_api_accepts_plans_without_torch_or_transformers(tmp_path, tiny_model):
    proc = subprocess.run([sys.executable, "-c", FRESH_API, str(tmp_path),
                           str(tiny_model.parent)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


CONCURRENT_FIRST_POSTS = """
import sys
import threading
from pathlib import Path

from service.db.migrate import upgrade
from tests.helpers.api import make_env, make_settings, RecordingQueue

tmp, root = Path(sys.argv[1]), Path(sys.argv[2])
url = f"sqlite:///{tmp / 'bitplan.sqlite3'}"
upgrade(url)
settings = make_settings(tmp, url, model_roots=[root], max_concurrent_jobs_per_team=1000)
env = make_env(settings, queue=RecordingQueue(), teams=("alpha",))
statuses = []
start = threading.Barrier(30)

def post():
    start.wait()
    r = env.client.post("/v1/plans", json={"model": "tiny-qwen", "budget": "0.9x"},
                        headers=env.h("alpha"))
    statuses.append(r.status_code)

threads = [threading.Thread(target=post) for _ in range(30)]
for t in threads:
    t.start()
for t in threads:
    t.join()
models = env.client.get("/v1/models", headers=env.h("alpha")).json()
profiles = sum(task == "bitplan.profile" for task, _ in env.queue.sent)
print(sorted(statuses), len(models), profiles)
"""


def test_concurrent_first_posts_for_a_model_never_fail(tmp_path, tiny_model):
    """30 first requests at once, in a fresh process, for a model nobody has registered: each
    reads the model's inventory; all are accepted (they raced on transformers' lazy imports
    when the inventory came from a meta-device skeleton: 29 × 500)."""
    proc = subprocess.run([sys.executable, "-c", CONCURRENT_FIRST_POSTS, str(tmp_path),
                           str(tiny_model.parent)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{[202] * 30} 1 1", proc.stdout
