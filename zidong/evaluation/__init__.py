"""`zidong eval`: zero-shot retrieval and classification of a trained model on held-out shards."""
