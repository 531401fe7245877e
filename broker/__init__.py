"""Talking to Kafka: the clients, broker health, the pipeline's topics, the embedded broker."""
