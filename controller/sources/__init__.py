"""Where the model's objects come from: the embedded store, or Kubernetes list/watch."""
