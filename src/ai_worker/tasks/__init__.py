"""The engine: task store, claim/lease/retry, registry (job factory), progress, reconciler."""
