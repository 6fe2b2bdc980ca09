"""mesh: run plans of local AI work across the GPUs of your own machines, over NATS JetStream."""

__version__ = "0.1.0"
