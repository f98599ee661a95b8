# The image of the sagaline workers, the CLI and the demo (see docker-compose.yml).
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The stack's drivers: Redis broker (kombu[redis] comes with the redis extra) and
# PostgreSQL store; prometheus-client serves the workers' /metrics. The source is
# removed once installed, so that the working
# directory never shadows the installed package.
COPY pyproject.toml README.md /tmp/sagaline/
COPY sagaline /tmp/sagaline/sagaline
RUN pip install "/tmp/sagaline[postgres,redis,prometheus,web]" && rm -rf /tmp/sagaline

# Workers run the robot example, which ships inside the package (sagaline.demo.robots);
# state and the demo's files go to SAGALINE_HOME.
RUN useradd --create-home --uid 1000 sagaline
USER sagaline
WORKDIR /home/sagaline
ENV SAGALINE_HOME=/home/sagaline/.sagaline

CMD ["sagaline", "--help"]
