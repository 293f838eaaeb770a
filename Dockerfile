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

# Dependencies first (cached while only the code changes).
COPY pyproject.toml README.md ./
RUN mkdir -p solver compressor service workers \
    && touch solver/__init__.py compressor/__init__.py service/__init__.py workers/__init__.py \
    && pip install . \
    && pip uninstall -y bitplan

COPY solver ./solver
COPY compressor ./compressor
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini ./
COPY models ./models
COPY data ./data
RUN pip install --no-deps -e . \
    && useradd --create-home --uid 10001 bitplan \
    && mkdir -p /data /models && chown bitplan /data

USER bitplan
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3).status != 200)" || exit 1
CMD ["bitplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
