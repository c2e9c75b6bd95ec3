"""Fine-tuning the reranker on a user's own labels: ``tandem train`` (see ``run``)."""
