"""caption-worker: caption images named by Kafka events with Gemma 3 on OpenVINO GenAI."""

__version__ = "0.1.0"
