"""The second stage: a sharded model forward captures the sites' activations and writes them, from
every host, into a tensorstore store with a trace of where each row came from."""
