"""apfl_jax: a JAX/Flax simulator for (asynchronous) personalized federated learning."""
