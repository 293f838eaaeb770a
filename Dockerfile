# bitplan: one image for the API and both kinds of worker (the command picks the role).
#   docker build -t bitplan .
#   docker compose up            (postgres, redis, migrations, api, worker-gpu, worker-cpu)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    BITPLAN_DATA_DIR=/data \
    BITPLAN_MODEL_ROOTS='["/app/models","/models"]'

WORKDIR /app

# torch comes from PyTorch's own wheel index, at the version pyproject.toml pins. The default
# is the CPU build (API and CPU worker: no CUDA libraries, a far smaller image). The GPU worker's
# image needs a CUDA build: pass that index, as docker-compose.yml does for worker-gpu, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t bitplan-gpu .
# (pick the cuXXX build your driver supports; `pip install .` below then keeps that torch).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Dependencies first (cached while only the code changes).
COPY pyproject.toml README.md ./
RUN TORCH_SPEC="$(python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print(next(x for x in d['project']['dependencies'] if x.startswith('torch')))")" \
    && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}" \
    && mkdir -p solver compressor service workers bench \
    && touch solver/__init__.py compressor/__init__.py service/__init__.py workers/__init__.py \
       bench/__init__.py \
    && pip install . \
    && pip uninstall -y bitplan

COPY solver ./solver
COPY compressor ./compressor
COPY service ./service
COPY workers ./workers
# the benchmarks (`bitplan bench`, registered through the bitplan.commands entry point)
COPY bench ./bench
COPY migrations ./migrations
COPY alembic.ini ./
COPY models ./models
COPY data ./data
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 bitplan \
    && mkdir -p /data /models && chown bitplan /data

USER bitplan
EXPOSE 8000
# The default command is the API: healthy = ready (/readyz: database and queue reachable; an
# HTTP error status raises, so the check exits non-zero). Workers override this in compose.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3).status != 200)" || exit 1
CMD ["bitplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
