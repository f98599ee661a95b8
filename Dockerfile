# The image of the sagaline workers, the CLI and the demo (see docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so that editing the examples does not reinstall them.
COPY pyproject.toml README.md ./
COPY sagaline ./sagaline
RUN pip install ".[postgres,redis]"

COPY examples ./examples

# Workers import examples.robots.app from here; state and the demo's files in SAGALINE_HOME.
RUN useradd --create-home --uid 1000 sagaline
USER sagaline
ENV PYTHONPATH=/app \
    SAGALINE_HOME=/home/sagaline/.sagaline

CMD ["sagaline", "--help"]
