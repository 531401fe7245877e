"""The ground floor: the shapes every stage shares (columns, the window value). No Kafka."""
