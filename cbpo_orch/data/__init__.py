"""What a user is: task definitions, the data loaders, history embeddings and the auxiliary index.

Knows nothing of models, Ray or the registry database."""
