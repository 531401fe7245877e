"""Child process of throughput.py: the raw rate, a batch consume() loop that does nothing.

Same client settings as the processor, so the ratio compares like with like.
"""

import json
import sys
import time
import uuid

from confluent_kafka import Consumer


def main() -> None:
    bootstrap, topic, expected, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.queue.backoff.ms": 10,
            "session.timeout.ms": 6000,
            "log_level": 2,
        }
    )
    consumer.subscribe([topic])
    count, first = 0, None
    while count < expected:
        messages = consumer.consume(batch_size, 1.0)
        if messages and first is None:
            first = time.perf_counter()
        count += len(messages)
    seconds = time.perf_counter() - first
    consumer.close()
    print(json.dumps({"records": count, "seconds": seconds}))


if __name__ == "__main__":
    main()
