"""Published methods, one module each, named for its paper: each is a configuration of attention edits,
sampler hooks and a start, never a copy of the loop."""
