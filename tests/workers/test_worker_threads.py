"""A worker with several task threads gives each one its share of the cores for torch (checked
in a child process: building the worker app reads and caches the process's settings)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.paths import REPO

CODE = """
import os
from types import SimpleNamespace
import torch
os.environ['BITPLAN_REDIS_URL'] = 'redis://127.0.0.1:6399/0'   # never connected
os.environ.pop('OMP_NUM_THREADS', None)
import workers.app as w
os.cpu_count = lambda: 16
print(w.share_cores(SimpleNamespace(concurrency=4)), torch.get_num_threads())
print(w.share_cores(SimpleNamespace(concurrency=32)), torch.get_num_threads())
os.environ['OMP_NUM_THREADS'] = '3'                             # the operator's setting wins
print(w.share_cores(SimpleNamespace(concurrency=4)), torch.get_num_threads())
"""


def test_each_task_thread_gets_its_share_of_the_cores(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin",
                                          "BITPLAN_DATA_DIR": str(tmp_path)}).stdout
    assert out.split() == ["4", "4", "1", "1", "None", "1"]


WARM = """
import os, sys
from types import SimpleNamespace
os.environ['BITPLAN_REDIS_URL'] = 'redis://127.0.0.1:6399/0'   # never connected
import workers.app as w
def worker(*queues):
    return SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(
        queues=SimpleNamespace(consume_from={q: None for q in queues}))))
print(w.warm_imports(worker('cpu')), 'compressor.pipeline.profile' in sys.modules, 'torch' in sys.modules)
print(w.warm_imports(worker('gpu', 'cpu')), 'compressor.pipeline.profile' in sys.modules,
      'compressor.pipeline.execute' in sys.modules)
"""


def test_gpu_worker_imports_the_model_side_at_start(tmp_path):
    """A `gpu` worker pays the torch/transformers imports when it starts (its first profile
    shard then starts with the others); a `cpu`-only worker does not import them at start."""
    out = subprocess.run([sys.executable, "-c", WARM], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin",
                                          "BITPLAN_DATA_DIR": str(tmp_path)}).stdout
    assert out.split() == ["False", "False", "False", "True", "True", "True"]
